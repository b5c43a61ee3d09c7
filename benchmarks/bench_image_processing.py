"""Host image-preprocessing throughput (single process): LEO tiling paths and LEO-MINI experts.

    python -m benchmarks.bench_image_processing [--repeats 3] [--device-sam]

Images are decoded PIL images held in memory (JPEG decoding is the data source's cost, measured separately as
'decode' for reference). Prints images/s per path; each figure is the best of ``--repeats`` passes over the set.
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from leo_jax.data.image_processing import get_preprocessor, leo_image_inputs
from leo_jax.data.tiling import jpeg_quality_augment, tile_image

# Typical instruction-tuning shapes (width, height): VGA photo, COCO-like, HD screenshot, tall document, odd sizes.
IMAGE_SIZES = [(640, 480), (500, 375), (1024, 768), (1920, 1080), (800, 1600), (333, 517), (1000, 301), (64, 900)]


def make_images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for width, height in IMAGE_SIZES:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        pixels = np.stack([255 * x / width, 255 * y / height, 127 + 127 * np.sin((x + 2 * y) / 9)], -1)
        pixels += rng.normal(0, 12, pixels.shape).astype(np.float32)
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def images_per_second(fn, images, repeats: int) -> float:
    fn(images[0])  # warm caches (resample taps, lazy imports)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            fn(image)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the image set; the best one is reported")
    parser.add_argument("--device-sam", action="store_true",
                        help="also time SamPreprocessor.device_from_small (448 -> 1024 on the default JAX device)")
    args = parser.parse_args()
    images = make_images()
    rng = np.random.default_rng(0)
    sam = get_preprocessor("sam")
    tiles_per_image = [len(tile_image(im)) for im in images]
    print(f"{len(images)} images, sizes {IMAGE_SIZES}; tiles per image {tiles_per_image} "
          f"(mean {np.mean(tiles_per_image):.2f})")

    encoded = {}
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded[id(image)] = buffer.getvalue()

    def decode(image):
        return Image.open(io.BytesIO(encoded[id(image)])).convert("RGB")

    rows = [
        ("decode JPEG (reference, source cost)", decode),
        ("LEO tiling only (<=7 x 448, bicubic)", lambda im: tile_image(im)),
        ("LEO tiling + JPEG aug", lambda im: [jpeg_quality_augment(t, rng) for t in tile_image(im)]),
        ("LEO full, SAM on host (tiles 448 + SAM 1024 uint8 + JPEG)",
         lambda im: leo_image_inputs(im, jpeg_rng=rng, sam=sam)),
        ("LEO full, SAM on device (tiles 448 + SAM 448 uint8 + JPEG) [recommended]",
         lambda im: leo_image_inputs(im, jpeg_rng=rng)),
        ("LEO eval, SAM on device (no JPEG)", lambda im: leo_image_inputs(im)),
    ]
    experts = {kind: get_preprocessor(kind) for kind in ("clip", "eva02", "convnext", "pix2struct")}
    for kind, processor in experts.items():
        rows.append((f"LEO-MINI {kind} {getattr(processor, 'output_size', '')}".rstrip(), processor.host))
    rows.append(("LEO-MINI all four experts", lambda im: [p.host(im) for p in experts.values()]))

    width = max(len(name) for name, _ in rows)
    for name, fn in rows:
        print(f"{name:<{width}}  {images_per_second(fn, images, args.repeats):8.1f} images/s")

    tile = tile_image(images[2])[0]
    start = time.perf_counter()
    for _ in range(5):
        np.stack([sam.host(tile) for _ in range(7)])
    host_ms = (time.perf_counter() - start) / 5 * 1e3
    print(f"SAM host cost for 7 tiles 448 -> 1024 (resize + to numpy + stack): {host_ms:.1f} ms; "
          f"bytes to device per image: host path {7 * 1024 * 1024 * 3 / 2**20:.1f} MiB, "
          f"device path {7 * 448 * 448 * 3 / 2**20:.1f} MiB")

    if args.device_sam:
        import jax
        import jax.numpy as jnp

        batch = jnp.asarray(np.stack([np.asarray(tile)] * 7))
        fn = jax.jit(sam.device_from_small)
        fn(batch).block_until_ready()
        start = time.perf_counter()
        for _ in range(10):
            fn(batch).block_until_ready()
        device_ms = (time.perf_counter() - start) / 10 * 1e3
        print(f"SAM device_from_small, 7 tiles on {jax.devices()[0].platform}: {device_ms:.2f} ms")


if __name__ == "__main__":
    main()
