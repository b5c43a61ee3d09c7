"""LEO / InternVL dynamic tiling: choose a grid of square tiles for an image and cut it.

The rule is the official LEO (= InternVL ``dynamic_preprocess``) one, reproduced exactly, including its
floating-point aspect-ratio comparison and its tie-break:

* candidate grids ``(cols, rows)`` with ``min_tiles <= cols * rows <= max_tiles``, ordered by tile count;
* the grid whose ``cols / rows`` is closest to ``width / height`` wins; on an exact tie with the best so far,
  a later (larger) grid replaces it only if the image area exceeds ``0.5 * tile**2 * cols * rows``
  (big images take more tiles, small ones do not get blown up);
* the image is resized (PIL bicubic, Pillow's default filter that InternVL relies on) to
  ``(tile * cols, tile * rows)`` and cut into row-major tiles; when there is more than one tile, the whole
  image resized to ``tile x tile`` is appended as a thumbnail, so an image yields 1..max_tiles+1 tiles.
"""
from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

# InternVL / LEO training draws the JPEG quality uniformly from range(75, 101) (`simulate_jpeg_degradation`
# in their dataset.py): 75 is where JPEG artefacts become visible but text stays legible, 100 is a near-
# lossless re-encode. We keep that range so training images see the same degradations as the original recipe.
DEFAULT_JPEG_QUALITY_RANGE = (75, 100)


@functools.cache
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, sorted by tile count.

    Built exactly like InternVL (a set of int tuples, then a stable sort on the product) so that the order of
    equal-count grids - which decides the winner of a same-count tie - is the official one.
    """
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"tiling needs 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def select_grid(width: int, height: int, min_tiles: int = 1, max_tiles: int = 6, tile: int = 448) -> tuple[int, int]:
    """The (cols, rows) grid LEO uses for an image of ``width x height`` pixels (the official rule, exactly)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    if tile < 1:
        raise ValueError(f"tile size must be positive, got tile={tile}")
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def tile_image(
    image: Image.Image,
    max_tiles: int = 6,
    tile: int = 448,
    min_tiles: int = 1,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Cut ``image`` into LEO tiles: row-major ``tile x tile`` RGB crops, thumbnail last if more than one."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    cols, rows = select_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, tile=tile)
    resized = image.resize((tile * cols, tile * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile, tile), Image.Resampling.BICUBIC))
    return tiles


def tiles_per_image_budget(n_images: int, max_tiles: int = 6) -> int:
    """Max tiles per image when a sample holds ``n_images`` images (InternVL: ``max(1, max_tiles // n)``)."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1 to split a tile budget, got {n_images}")
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    return max(1, max_tiles // n_images)


def jpeg_quality_augment(
    image: Image.Image,
    rng: np.random.Generator,
    quality_range: tuple[int, int] = DEFAULT_JPEG_QUALITY_RANGE,
) -> Image.Image:
    """Re-encode ``image`` as JPEG at a quality drawn uniformly from ``quality_range`` (inclusive) and decode it.

    LEO applies this to the InternViT tiles only (training), with Pillow's default JPEG settings as InternVL.
    """
    low, high = quality_range
    if not 1 <= low <= high <= 100:
        raise ValueError(f"JPEG quality_range must satisfy 1 <= lo <= hi <= 100, got {quality_range}")
    quality = int(rng.integers(low, high + 1))
    if image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    degraded = Image.open(buffer)
    degraded.load()
    return degraded


def max_tiles_per_sample(max_tiles: int = 6, max_images: int = 1, use_thumbnail: bool = True) -> int:
    """The most tiles a sample with 1..max_images images can yield: n images of ``tiles_per_image_budget(n)`` tiles
    each, plus a thumbnail per image whose budget allows more than one tile (6 tiles: 7 for one image, 8 for two)."""
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    worst = 0
    for n in range(1, max_images + 1):
        budget = tiles_per_image_budget(n, max_tiles)
        worst = max(worst, n * (budget + int(use_thumbnail and budget > 1)))
    return worst
