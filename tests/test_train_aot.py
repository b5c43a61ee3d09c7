"""leo_jax.aot pieces that need no TPU: topology names, and the abstract batch equals what the pipeline yields."""

from __future__ import annotations

import pytest

from leo_jax.aot import batch_shapes, topology_name
from leo_jax.config import load_config
from leo_jax.data import pipeline, synthetic, visual


@pytest.mark.parametrize("name, expected", [
    ("v5p-128", ("v5p:4x4x4", "megacore")), ("v5p-8", ("v5p:2x2x1", "megacore")), ("v5e-256", ("v5e:16x16", "default")),
    ("v6e-64", ("v6e:8x8", "default")), ("v4:2x2x2", ("v4:2x2x2", "megacore"))])
def test_topology_names(name, expected):
    assert topology_name(name) == expected


def test_bad_topology_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown slice size"):
        topology_name("v5p-96")
    with pytest.raises(ValueError, match="use e.g. v5p-128"):
        topology_name("tpu-big")


@pytest.mark.parametrize("preset", ["tiny_leo_mini_train", "tiny_leo_train"])
def test_abstract_batch_matches_the_pipeline(tmp_path, preset):
    synthetic.write_dataset(str(tmp_path), 8, val_num=4)
    config = load_config(preset)
    config.data.train_files = str(tmp_path / "data.json")
    config.data.global_batch_size = 4
    kind = visual.for_config(config)
    batch = next(pipeline.make_train_iterator(config.data, kind))
    batch.pop("sample_index")
    abstract = batch_shapes(config, kind)
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}
