"""Remote workdirs and data (gs://): metrics.jsonl, TensorBoard, eval results' annotation reading and the data
pipeline go through etils.epath / fsspec. No bucket is reachable here, so the gs:// protocol is served by fsspec's
in-memory filesystem (what etils.epath and the code under test see is the same gs:// path handling); Orbax's own
GCS driver (tensorstore) is not exercised."""

import json
import os

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from tensorboardX import record_writer

from leo_jax.config import load_config
from leo_jax.data import pipeline, synthetic, visual
from leo_jax.train import evaluate, metrics
from leo_jax.train.synthetic_data import ensure_synthetic_data


class _MemoryRecordWriter:
    """tensorboardX event-file writer into the in-memory filesystem (its own gs:// writer calls GCS directly)."""

    def __init__(self, path):
        self.path, self.data = path, b""

    def write(self, value):
        self.data += value

    def flush(self):
        with fsspec.filesystem("gs").open(self.path, "wb") as f:
            f.write(self.data)

    def close(self):
        self.flush()


class _MemoryWriterFactory:
    def open(self, path):
        return _MemoryRecordWriter(path)

    def directory_check(self, path):
        pass


@pytest.fixture
def gs(monkeypatch):
    """gs:// (and etils' 'gcs' filesystem name) served from a fresh in-memory filesystem."""
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, MemoryFileSystem, clobber=True)
    fs = fsspec.filesystem("gs")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", _MemoryWriterFactory())
    return fs


def test_metrics_and_tensorboard_in_a_gs_workdir(gs):
    writer = metrics.MetricsWriter("gs://bucket/run")
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.truncate(2)  # a resume from step 2 drops record 3, then rewrites it
    writer.write(3, {"loss": 0.25})
    writer.close()
    lines = gs.cat("gs://bucket/run/metrics.jsonl").decode().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5},
                                                     {"step": 3, "loss": 0.25}]
    again = metrics.MetricsWriter("gs://bucket/run")  # a resumed run appends after the existing records
    again.write(4, {"loss": 0.2})
    again.close()
    assert len(gs.cat("gs://bucket/run/metrics.jsonl").decode().splitlines()) == 4
    events = gs.glob("gs://bucket/run/tensorboard/events.out.tfevents.*")
    assert events and all(gs.size(e) > 0 for e in events)
    assert not os.path.exists("gs:") and not os.path.exists("gs:/bucket")  # nothing written to ./gs:/...


def test_annotations_and_images_read_from_gs(gs, tmp_path):
    synthetic.write_dataset(str(tmp_path), 6, seed=0, val_num=4, multi_turn_fraction=0.0, multi_image_fraction=0.0,
                            text_only_fraction=0.0)
    for root, _, files in os.walk(tmp_path):
        for name in files:
            local = os.path.join(root, name)
            gs.pipe(f"gs://bucket/set/{os.path.relpath(local, tmp_path)}", open(local, "rb").read())
    config = load_config("tiny_leo_mini")
    kind = visual.for_config(config)
    batches = {}
    for where, base in (("local", str(tmp_path)), ("gs", "gs://bucket/set")):
        data = config.data.copy_and_resolve_references()
        data.update(train_files=f"{base}/val.json", eval_batch_size=4)
        batches[where] = list(pipeline.make_eval_iterator(data, kind, process_index=0, process_count=1))
        assert batches[where][0]["image_mask"].any(), where  # the images were found and decoded
    for a, b in zip(batches["local"], batches["gs"], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert evaluate.load_annotation_records("gs://bucket/set/val.json") == \
        json.loads((tmp_path / "val.json").read_text())


def test_synthetic_set_needs_a_local_directory_with_a_gs_workdir(gs):
    config = load_config("tiny_leo_mini_train")
    with pytest.raises(ValueError, match="set --config.synthetic.dir to a local directory"):
        ensure_synthetic_data(config, "gs://bucket/run")
