"""JSON + image files vs ArrayRecord shards: read throughput per host, raw and through the full input pipeline.

Writes a LLaVA-style set of distinct ~1000x700 JPEGs (one file per record, as LLaVA-665K), converts it with
``leo_jax.data.to_arrayrecord`` (timed), then measures in a random order (as the shuffled trainer reads):
- raw: records/s and MB/s of getting a record and its encoded image bytes (JSON: parse the line, open and read the
  image file; ArrayRecord: one random-access read of the record with its bytes);
- pipeline: samples/s of ``pipeline.make_train_iterator`` (decode + LEO-MINI expert preprocessing + tokenise) from
  each source, workers 0.
The page cache is warm for both after the first pass; on a network filesystem the per-file open of the JSON
source costs more than here, so the raw figure on local disk is a lower bound of the difference.

    python -m benchmarks.bench_arrayrecord [--samples 512] [--batch 4]
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np

from benchmarks.bench_data import bench, bench_config, realistic_image
from leo_jax.data import sources, to_arrayrecord


def write_dataset(directory: str, num_samples: int) -> str:
    rng = np.random.default_rng(0)
    path = os.path.join(directory, "data.jsonl")
    with open(path, "w") as f:
        for i in range(num_samples):
            realistic_image(rng).save(os.path.join(directory, f"{i}.jpg"), quality=90)
            conversations = [{"from": "human", "value": "<image>\nWhat color is the circle in the picture?"},
                             {"from": "gpt", "value": "The circle is red and it sits next to a blue square."}]
            f.write(json.dumps({"id": str(i), "image": f"{i}.jpg", "conversations": conversations}) + "\n")
    return path


def raw_read(source, order) -> tuple[float, float]:
    """(records/s, MB/s) of reading each record with its encoded image bytes."""
    total = 0
    start = time.perf_counter()
    for index in order:
        record = source[int(index)]
        for image in record.images:
            if isinstance(image, str):
                with open(image, "rb") as f:
                    image = f.read()
            total += len(image)
    elapsed = time.perf_counter() - start
    return len(order) / elapsed, total / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pipeline-samples", type=int, default=64, help="samples timed through the pipeline")
    args = parser.parse_args()
    print(f"cpu cores: {os.cpu_count()}; {args.samples} records, one distinct 1000x700 JPEG each")
    with tempfile.TemporaryDirectory() as directory:
        data = write_dataset(directory, args.samples)
        start = time.perf_counter()
        shards, stats = to_arrayrecord.convert(data, os.path.join(directory, "ar"), records_per_shard=256,
                                               progress=False)
        convert_s = time.perf_counter() - start
        print(f"to_arrayrecord: {stats['converted']} records in {convert_s:.2f} s "
              f"({stats['converted'] / convert_s:.0f} records/s)")
        order = np.random.default_rng(1).permutation(args.samples)
        json_source, shard_source = sources.open_source(data), sources.open_source(shards)
        for name, source in (("json+files", json_source), ("arrayrecord", shard_source)):
            raw_read(source, order[:32])  # warm: open files, page cache
            records_s, mb_s = raw_read(source, order)
            print(f"raw read     {name:11s}: {records_s:8.0f} records/s  {mb_s:7.1f} MB/s")
        num_batches = args.pipeline_samples // args.batch
        for name, path in (("json+files", data), ("arrayrecord", shards)):
            config, kind = bench_config(path, "leo_mini", args.batch, workers=0)
            rate = bench(config, kind, args.batch, num_batches)
            print(f"pipeline     {name:11s}: {rate:8.2f} samples/s (LEO-MINI preprocessing, workers 0)")


if __name__ == "__main__":
    main()
