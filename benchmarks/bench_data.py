"""Input-pipeline throughput: samples/s of the full LEO and LEO-MINI host preprocessing, 0 vs N workers.

Builds a small LLaVA-style set of realistic ~1000x700 JPEGs (smooth gradients + shapes, so JPEG decode costs what
photos cost) in a temporary directory, then times ``pipeline.make_train_iterator`` end to end: read, decode,
LEO tiling (a 3x2 grid + thumbnail = 7 tiles of 448 px, each also resized to 1024 px for SAM, JPEG augmentation
of the InternViT tiles) or LEO-MINI per-expert preprocessing (CLIP 336, EVA-02 336, ConvNeXt 1024, Pix2Struct
576 patches), tokenisation and collation. The first batch (worker start-up) is not timed. It also prints the
single-thread CPU time of the per-sample transform, which does not depend on other load on the machine.

    python -m benchmarks.bench_data [--samples 48] [--batch 4] [--workers 0 2]
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from leo_jax.config import load_config
from leo_jax.data import pipeline, sources, visual
from leo_jax.data.tokenizer import SYNTHETIC_TOKENIZER_PATH


def realistic_image(rng: np.random.Generator, width: int = 1000, height: int = 700) -> Image.Image:
    """A smooth colour gradient with a few filled shapes: compresses and decodes like a photo, not like noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * rng.uniform(80, 255, 3)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width - 50)), int(rng.integers(0, height - 50))
        box = (x0, y0, x0 + int(rng.integers(30, 300)), y0 + int(rng.integers(30, 300)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def write_dataset(directory: str, num_samples: int) -> str:
    rng = np.random.default_rng(0)
    num_images = min(num_samples, 16)  # distinct files; records reuse them
    for i in range(num_images):
        realistic_image(rng).save(os.path.join(directory, f"{i}.jpg"), quality=90)
    path = os.path.join(directory, "data.jsonl")
    with open(path, "w") as f:
        for i in range(num_samples):
            conversations = [{"from": "human", "value": "<image>\nWhat color is the circle in the picture?"},
                             {"from": "gpt", "value": "The circle is red and it sits next to a blue square."}]
            f.write(json.dumps({"id": str(i), "image": f"{i % num_images}.jpg", "conversations": conversations}) + "\n")
    return path


def cpu_ms_per_sample(config, kind, num_samples: int) -> float:
    """CPU time (this process, one thread) of the per-sample transform: load-independent cost of one sample."""
    transform = pipeline.SampleTransform(config, kind, training=True)
    source = sources.open_sources(config.train_files)
    transform(0, (0, source[0]))  # builds tokenizer and preprocessors
    start = time.process_time()
    for index in range(num_samples):
        sample = transform(index, (index, source[index]))
        assert pipeline.SKIP_KEY not in sample, sample
    return (time.process_time() - start) / num_samples * 1000


def bench(config, kind, batch_size: int, num_batches: int) -> float:
    iterator = pipeline.make_train_iterator(config, kind, process_index=0, process_count=1)
    try:
        first = next(iterator)  # start-up (worker spawn, tokenizer load) not timed
        if "tile_mask" in first:
            assert first["tile_mask"].sum(1).tolist() == [7] * batch_size, first["tile_mask"].sum(1)
        start = time.perf_counter()
        for _ in range(num_batches):
            next(iterator)
        elapsed = time.perf_counter() - start
    finally:
        iterator.close()
    return num_batches * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=48, help="records in the generated set")
    parser.add_argument("--batch", type=int, default=4, help="rows per batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--models", nargs="+", default=["leo", "leo_mini"])
    args = parser.parse_args()
    num_batches = args.samples // args.batch - 1
    print(f"cpu cores: {os.cpu_count()}; {args.samples} samples of 1000x700 JPEG, batch {args.batch}, "
          f"{num_batches} timed batches")
    with tempfile.TemporaryDirectory() as directory:
        data = write_dataset(directory, args.samples)
        for model_kind in args.models:
            for workers in args.workers:
                config, kind = bench_config(data, model_kind, args.batch, workers)
                rate = bench(config, kind, args.batch, num_batches)
                print(f"{model_kind:9s} workers={workers}: {rate:6.2f} samples/s")
            cpu_ms = cpu_ms_per_sample(config, kind, min(args.samples, 16))
            print(f"{model_kind:9s} transform CPU time: {cpu_ms:6.1f} ms/sample "
                  f"(= {1000 / cpu_ms:.1f} samples/s per core)")


PRESETS = {"leo": "leo_8b", "leo_mini": "leo_mini_llama3_8b"}


def bench_config(data: str, model_kind: str, batch_size: int, workers: int):
    """(data config, data-side kind) of the full-size preset, reading ``data``; LEO's SAM inputs at 1024 px."""
    full = load_config(PRESETS[model_kind])
    config = full.data
    config.train_files = data
    config.tokenizer = SYNTHETIC_TOKENIZER_PATH
    config.seq_len = 4096 if model_kind == "leo" else 2048
    config.global_batch_size = batch_size
    config.num_epochs = None
    config.num_workers = workers
    config.leo.sam_size = 1024
    return config, visual.for_config(full)


if __name__ == "__main__":  # grain worker processes are spawned: they re-import this module
    main()
