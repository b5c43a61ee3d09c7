"""Convert a LLaVA-style JSON/JSONL set and its images into TFDS ArrayRecord shards (no TensorFlow needed).

Why: on a pod, millions of small image files on a network filesystem are slow to open; a few large ArrayRecord
shards with the encoded image bytes inside give fast random access (Grain shuffles globally by index) and one
self-describing dataset directory to copy around. Read the result with ``sources.ArrayRecordSource``.

Each record keeps the conversation (as JSON text), the image names and their encoded bytes (the original file
bytes, not re-encoded). Records keep the order of the annotation file. A record whose image file is missing is
kept with empty bytes, so the pipeline skips and counts it exactly as it would from the JSON source; records
that do not parse at all are dropped here, logged, and counted in the returned stats.

Usage::

    python -m leo_jax.data.tfds_builder --annotations llava_v1_5_mix665k.json --image_root /data/images \
        --out /data/tfds
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from leo_jax.data import sources

DATASET_NAME = "llava_conversations"
VERSION = "1.0.0"


class LlavaConversations(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over one LLaVA annotation file (+ image root), written as ArrayRecord."""

    VERSION = tfds.core.Version(VERSION)
    name = DATASET_NAME

    def __init__(self, *, annotation_path: str | None = None, image_root: str | None = None, split="train", **kwargs):
        self._annotation_path = annotation_path
        self._image_root = image_root
        self._split = split
        self.conversion_stats: collections.Counter = collections.Counter()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="LLaVA-style conversations with their encoded images (leo_jax).",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "conversations": tfds.features.Text(),  # JSON list of {"from", "value"} turns
                    "image_names": tfds.features.Sequence(tfds.features.Text()),
                    "image_bytes": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
                }
            ),
            disable_shuffling=True,  # record i of the shards is record i of the annotation file
        )

    def _split_generators(self, dl_manager):
        if self._annotation_path is None:
            raise ValueError("LlavaConversations needs annotation_path to generate data")
        return {self._split: self._generate_examples()}

    def _generate_examples(self):
        source = sources.LlavaJsonSource(self._annotation_path, image_root=self._image_root)
        root = source.image_root
        for index in range(len(source)):
            record = source[index]
            if record.error is not None:
                reason, detail = record.error
                self.conversion_stats[reason] += 1
                logging.warning("tfds_builder: dropping %s (%s: %s)", record.origin, reason, detail)
                continue
            image_bytes = []
            for path in record.images:
                try:
                    with open(path, "rb") as f:
                        image_bytes.append(f.read())
                except OSError as e:
                    self.conversion_stats["missing_image"] += 1
                    logging.warning("tfds_builder: %s: cannot read image %s (%s); stored empty", record.origin, path, e)
                    image_bytes.append(b"")
            self.conversion_stats["converted"] += 1
            yield index, {
                "id": record.sample_id,
                "conversations": json.dumps(record.conversations, ensure_ascii=False),
                "image_names": [os.path.relpath(p, root) for p in record.images],
                "image_bytes": image_bytes,
            }


def build_array_record_dataset(
    annotation_path: str, out_dir: str, image_root: str | None = None, split: str = "train"
) -> tuple[str, dict[str, int]]:
    """Write ``annotation_path`` (+ images) as ArrayRecord shards under ``out_dir``.

    Returns the TFDS dataset directory (pass it as ``data.train_files``) and the conversion counts.
    """
    builder = LlavaConversations(
        annotation_path=annotation_path,
        image_root=image_root,
        split=split,
        data_dir=out_dir,
        file_format="array_record",
    )
    builder.download_and_prepare()
    return str(builder.data_dir), dict(builder.conversion_stats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="LLaVA .json (array) or .jsonl annotation file")
    parser.add_argument("--image_root", default=None, help="directory the 'image' paths are relative to")
    parser.add_argument("--out", required=True, help="TFDS data_dir to write into")
    parser.add_argument("--split", default="train")
    args = parser.parse_args(argv)
    dataset_dir, stats = build_array_record_dataset(args.annotations, args.out, args.image_root, args.split)
    print(f"wrote {dataset_dir}: {stats}")


if __name__ == "__main__":
    main()
