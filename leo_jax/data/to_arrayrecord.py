"""Convert a LLaVA-style JSON/JSONL set and its images into sharded ArrayRecord files (no TensorFlow needed).

Why: on a pod, millions of small image files on a network filesystem are slow to open; a few large ArrayRecord
shards with the encoded image bytes inside give fast random access (Grain shuffles globally by index) and one
self-describing dataset directory to copy around. The trainer reads the result with ``sources.ArrayRecordSource``
(``data.train_files=OUT``), with the same sample semantics as the JSON source.

Each record keeps the conversation (as JSON text, system turn included), the image names and their encoded bytes
(the original file bytes, not re-encoded). Records keep the order of the annotation file. A record whose image file
is missing is kept with empty bytes, so the pipeline skips and counts it exactly as it would from the JSON source;
records that do not parse at all are dropped here, logged, and counted.

Shard k holds annotation records [k * records_per_shard, (k + 1) * records_per_shard). Each shard is written to a
temporary file, renamed when complete, then its counts are written next to it (``.stats.json``); a shard with its
counts is done. So a killed conversion resumes with the first unfinished shard when run again with the same
arguments, and the dataset metadata (TFDS ``dataset_info.json`` + ``features.json``) is written last, after the
record count read back from the shards is checked against the converted count.

Usage::

    python -m leo_jax.data.to_arrayrecord --src llava_v1_5_mix665k.json --image-root /data/images --out /data/665k
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

from leo_jax.data import sources

DATASET_NAME = "llava_conversations"
VERSION = "1.0.0"
CONVERTED = "converted"
MISSING_IMAGE = "missing_image"
LAYOUT_FILE = "conversion.json"  # the arguments a partial conversion was started with

logger = logging.getLogger(__name__)


def features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "conversations": tfds.features.Text(),  # JSON list of {"from", "value"} turns
        "image_names": tfds.features.Sequence(tfds.features.Text()),
        "image_bytes": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
    })


def _example(record: sources.Record, image_root: str, stats: collections.Counter) -> dict:
    image_bytes = []
    for path in record.images:
        try:
            with open(path, "rb") as f:
                image_bytes.append(f.read())
        except OSError as e:
            stats[MISSING_IMAGE] += 1
            logger.warning("to_arrayrecord: %s: cannot read image %s (%s); stored empty", record.origin, path, e)
            image_bytes.append(b"")
    stats[CONVERTED] += 1
    return {
        "id": record.sample_id,
        "conversations": json.dumps(record.conversations, ensure_ascii=False),
        "image_names": [os.path.relpath(p, image_root) for p in record.images],
        "image_bytes": image_bytes,
    }


def _check_layout(out_dir: str, layout: dict) -> None:
    """A resumed conversion must use the arguments it started with (shard boundaries depend on them)."""
    path = os.path.join(out_dir, LAYOUT_FILE)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != layout:
            raise ValueError(f"{out_dir} holds a conversion started with {previous}, not {layout}: resume with the "
                             "same --src, --image-root and --records-per-shard, or choose an empty --out")
    else:
        with open(path + ".tmp", "w") as f:
            json.dump(layout, f)
        os.replace(path + ".tmp", path)


def convert(src: str, out_dir: str, image_root: str | None = None, *, split: str = "train",
            records_per_shard: int = 2048, progress: bool = True) -> tuple[str, dict[str, int]]:
    """Writes ``src`` (+ images) as ArrayRecord shards into ``out_dir`` (resuming a partial run there).

    Returns the dataset directory (``out_dir``; pass it as ``data.train_files``) and the conversion counts:
    ``converted``, ``missing_image`` and the sources' parse-failure reasons.
    """
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    source = sources.LlavaJsonSource(src, image_root=image_root)
    root = source.image_root
    num_shards = max(1, math.ceil(len(source) / records_per_shard))
    os.makedirs(out_dir, exist_ok=True)
    _check_layout(out_dir, {"src": os.path.abspath(src), "image_root": os.path.abspath(root), "split": split,
                            "records": len(source), "records_per_shard": records_per_shard})
    template = tfds.core.ShardedFileTemplate(data_dir=out_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                                             dataset_name=DATASET_NAME, split=split, filetype_suffix="array_record")
    paths = [os.fspath(p) for p in template.sharded_filepaths(num_shards)]
    feature_spec = features()
    totals: collections.Counter = collections.Counter()
    shard_lengths = []
    bar = tqdm.tqdm(total=len(source), unit="rec", desc="to_arrayrecord", disable=not progress)
    for shard, path in enumerate(paths):
        start, stop = shard * records_per_shard, min(len(source), (shard + 1) * records_per_shard)
        stats_path = path + ".stats.json"
        if os.path.exists(stats_path) and os.path.exists(path):  # finished in an earlier run
            with open(stats_path) as f:
                stats = collections.Counter(json.load(f))
        else:
            stats = collections.Counter()
            writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
            for index in range(start, stop):
                record = source[index]
                if record.error is not None:
                    reason, detail = record.error
                    stats[reason] += 1
                    logger.warning("to_arrayrecord: dropping %s (%s: %s)", record.origin, reason, detail)
                else:
                    writer.write(feature_spec.serialize_example(_example(record, root, stats)))
                bar.update(1)
            writer.close()
            os.replace(path + ".tmp", path)
            with open(stats_path + ".tmp", "w") as f:
                json.dump(dict(stats), f)
            os.replace(stats_path + ".tmp", stats_path)
        if bar.n < stop:
            bar.update(stop - bar.n)
        totals.update(stats)
        shard_lengths.append(stats[CONVERTED])
    bar.close()

    split_info = tfds.core.SplitInfo(name=split, shard_lengths=shard_lengths,
                                     num_bytes=sum(os.path.getsize(p) for p in paths), filename_template=template)
    tfds.folder_dataset.write_metadata(data_dir=out_dir, features=feature_spec, split_infos=[split_info],
                                       filename_template=template, version=VERSION, check_data=False,
                                       description="LLaVA-style conversations with their encoded images (leo_jax).")
    read_back = len(sources.ArrayRecordSource(out_dir, split=split))
    if read_back != totals[CONVERTED]:
        raise RuntimeError(f"{out_dir}: the shards hold {read_back} records but {totals[CONVERTED]} were converted; "
                           "delete the directory and convert again")
    return out_dir, dict(totals)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="LLaVA .json (array) or .jsonl annotation file")
    parser.add_argument("--image-root", default=None,
                        help="directory the records' 'image' paths are relative to (default: the --src directory)")
    parser.add_argument("--out", required=True, help="dataset directory to write (or resume) into")
    parser.add_argument("--split", default="train")
    parser.add_argument("--records-per-shard", type=int, default=2048)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dataset_dir, stats = convert(args.src, args.out, args.image_root, split=args.split,
                                 records_per_shard=args.records_per_shard)
    print(f"wrote {dataset_dir}: {stats.get(CONVERTED, 0)} records, count verified; {stats}")


if __name__ == "__main__":
    main()
