"""Multi-image samples: LEO's official tile split with a row budget that fits it (derived, checked at start), and
LEO-MINI's image slots; two-image rows of the synthetic set train in both tiny presets without a skip."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leo_jax.config import load_config
from leo_jax.data import pipeline, synthetic, tiling, visual
from leo_jax.models.registry import build_model
from tests.test_pipeline import _config, _context_id, _iterator, _write_images


def test_row_tile_budget_of_the_official_split():
    assert [tiling.max_tiles_per_sample(6, n) for n in (1, 2, 3, 4)] == [7, 8, 9, 9]
    assert tiling.max_tiles_per_sample(6, 2, use_thumbnail=False) == 6
    assert tiling.max_tiles_per_sample(1, 2) == 2


def test_two_wide_images_get_their_tiles_in_a_derived_row(tmp_path):
    """Two 3:1 images: 3 tiles + thumbnail each = 8 tiles, in one row of 8 derived slots, not skipped."""
    (tmp_path / "images").mkdir()
    _write_images(tmp_path, np.random.default_rng(0), [("a.png", (90, 30)), ("b.png", (90, 30))])
    record = {"id": "two", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich is wider?"}, {"from": "gpt", "value": "red"}]}
    (tmp_path / "two.jsonl").write_text(json.dumps(record) + "\n")
    config = _config(tmp_path, "two.jsonl", eval_batch_size=1, **{"leo.max_images_per_sample": 2,
                                                                  "leo.max_tiles_per_row": -1})
    config.eval_files, config.eval_image_root = str(tmp_path / "two.jsonl"), str(tmp_path / "images")
    iterator = _iterator("eval", config, "leo")
    batch = next(iterator)
    assert iterator.skip_stats.as_metrics()["data/records_skipped"] == 0
    iterator.close()
    assert batch["tile_mask"].shape == (1, 8) and batch["tile_mask"].sum() == 8
    context = np.flatnonzero(batch["input_ids"][0] == _context_id())
    assert len(context) == 8 * 4  # 4 tokens per tile in this config
    starts = np.flatnonzero(np.diff(context) > 1)  # two <IMG_CONTEXT> runs, one per image: 4 tiles each
    assert len(starts) == 1 and starts[0] + 1 == 4 * 4
    # An explicit budget below what the data config allows is an error at start, naming the fields.
    config.leo.max_tiles_per_row = 7
    with pytest.raises(ValueError, match="data.leo.max_tiles_per_row=7 is below the 8 tiles .* "
                                         "data.leo.max_images_per_sample=2"):
        _iterator("eval", config, "leo")


@pytest.mark.parametrize("preset, kind", [("tiny_leo_train", "leo"), ("tiny_leo_mini_train", "leo_mini")])
def test_synthetic_two_image_questions_train_in_the_tiny_presets(tmp_path, preset, kind):
    synthetic.write_dataset(str(tmp_path), 8, seed=0, val_num=1, multi_turn_fraction=0.0, multi_image_fraction=0.5,
                            text_only_fraction=0.0)
    records = json.loads((tmp_path / "data.json").read_text())
    two = [i for i, r in enumerate(records) if isinstance(r.get("image"), list) and len(r["image"]) == 2]
    assert len(two) >= 4 and len(records) <= 16
    config = load_config(preset)  # the train presets as they are: two images per row / sample
    config.data.update(train_files=str(tmp_path / "data.json"), global_batch_size=16, shuffle=False, num_epochs=1)
    data_kind = visual.for_config(config)
    iterator = pipeline.make_train_iterator(config.data, data_kind, process_index=0, process_count=1)
    batch = next(iterator)
    stats = iterator.skip_stats.as_metrics()
    iterator.close()
    assert stats["data/records_skipped"] == 0 and stats["data/records_seen"] == len(records)
    rows = batch["sample_index"][:, 0]
    mask_key = "tile_mask" if kind == "leo" else "image_mask"
    per_image = data_kind.tokens_per_tile if kind == "leo" else data_kind.tokens_per_image  # tiny LEO: 1 tile/image
    context = (batch["input_ids"] == config.model.image_context_id).sum(1)
    assert np.isin(rows, two).sum() == len(two)
    for row in np.flatnonzero(np.isin(rows, two)):
        assert batch[mask_key][row].sum() == 2 and context[row] == 2 * per_image
    model = build_model(config.model, nnx.Rngs(0))
    inputs = {k: jnp.asarray(v) for k, v in batch.items() if k != "sample_index"}
    out = model.train_forward(inputs)
    assert int(out.aux["visual_token_mismatch"]) == 0 and bool(jnp.isfinite(out.out).all())
    if kind == "leo_mini":  # each image compressed by CoTR to its own tokens
        embeds, _ = model.embed_inputs(inputs)
        row = int(np.flatnonzero(np.isin(rows, two))[0])
        positions = np.flatnonzero(batch["input_ids"][row] == config.model.image_context_id)
        first, second = (np.asarray(embeds[row, positions[i * per_image:(i + 1) * per_image]]) for i in (0, 1))
        assert np.abs(first - second).max() > 1e-3
