"""The built-in synthetic visual-QA set as a training default: generated into the work directory when absent."""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from leo_jax.data import synthetic
from leo_jax.train import distributed

logger = logging.getLogger("leo_jax.train")


def ensure_synthetic_data(config: ml_collections.ConfigDict, workdir: str) -> None:
    """With a `config.synthetic` section ({num, val_num, seed, image_size, multi_image_fraction, caption_fraction,
    follow_ups, dir}), points data.train_files / data.eval_files at the set in `dir` (default WORKDIR/synthetic),
    writing it first if absent. Explicit data.train_files win: then the synthetic set is neither written nor used
    (data.eval_files stays as given; empty = evaluate on the training files)."""
    if "synthetic" not in config:
        return
    spec = config.synthetic
    out = spec.dir or os.path.join(workdir, "synthetic")
    train_file, val_file = os.path.join(out, "data.json"), os.path.join(out, "val.json")
    if config.data.train_files and config.data.train_files != train_file:
        logger.info("data.train_files is given (%s): the preset's built-in synthetic set is not used",
                    config.data.train_files)
        return
    if "://" in out:
        raise ValueError(f"the built-in synthetic set is written with local file I/O and {out} is remote: set "
                         "--config.synthetic.dir to a local directory, or give data.train_files")
    if jax.process_index() == 0:
        _write_if_absent(spec, out, train_file, val_file)
    distributed.allgather_json("synthetic_set_written", True)  # the other processes wait for process 0's set
    config.data.train_files = train_file
    config.data.eval_files = config.data.eval_files or val_file


def _write_if_absent(spec: ml_collections.ConfigDict, out: str, train_file: str, val_file: str) -> None:
    """Process 0's part: writes the set (or its val.jsonl, for a set from before that file existed)."""
    if not (os.path.exists(train_file) and os.path.exists(val_file)):
        logger.info("writing the synthetic set (%d train / %d validation samples) to %s", spec.num, spec.val_num, out)
        info = synthetic.write_dataset(out, spec.num, spec.seed, val_num=spec.val_num, image_size=spec.image_size,
                                       multi_image_fraction=spec.multi_image_fraction,
                                       caption_fraction=spec.get("caption_fraction", 0.0),
                                       follow_ups=spec.get("follow_ups", 0))
        logger.info("chance levels (validation):\n%s", synthetic.format_chance_table(info["chance_val"]))
    elif not os.path.exists(os.path.join(out, "val.jsonl")):  # a set written before val.jsonl existed
        with open(val_file) as f:
            synthetic.write_benchmark_file(out, json.load(f))
