"""LEO tiling: grid choice vs the official rule and a brute-force restatement, tiles vs transformers' GotOcr2."""
import io
import itertools

import numpy as np
import pytest
from PIL import Image

from leo_jax.data.tiling import (
    DEFAULT_JPEG_QUALITY_RANGE,
    candidate_grids,
    jpeg_quality_augment,
    select_grid,
    tile_image,
    tiles_per_image_budget,
)


def official_select_grid(width, height, min_num=1, max_num=6, image_size=448):
    """LEO's `dynamic_preprocess` + `find_closest_aspect_ratio` (leo_chat/leo/train/dataset.py), grid part."""
    aspect_ratio = width / height
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff = float('inf')
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def brute_force_grid(width, height, min_tiles=1, max_tiles=6, tile=448):
    """Independent statement: among the grids at the minimal aspect distance (in tile-count order), take the last
    one after the first whose area test passes, else the first."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    grids.sort(key=lambda g: g[0] * g[1])
    distance = {g: abs(width / height - g[0] / g[1]) for g in grids}
    best = min(distance.values())
    tied = [g for g in grids if distance[g] == best]
    larger_ok = [g for g in tied[1:] if width * height > 0.5 * tile * tile * g[0] * g[1]]
    return larger_ok[-1] if larger_ok else tied[0]


def test_candidate_grids_cover_all_tile_counts_in_order():
    grids = candidate_grids(1, 6)
    assert sorted(grids) == sorted((c, r) for c in range(1, 7) for r in range(1, 7) if c * r <= 6)
    counts = [c * r for c, r in grids]
    assert counts == sorted(counts)
    assert set(candidate_grids(3, 4)) == {(1, 3), (3, 1), (1, 4), (4, 1), (2, 2)}


SIZES = sorted(set(range(1, 2400, 53)) | {1, 2, 3, 447, 448, 449, 633, 634, 895, 896, 897, 1344, 1792, 2688, 4000})


@pytest.mark.parametrize("min_tiles,max_tiles,tile", [(1, 6, 448), (1, 12, 448), (1, 8, 448), (2, 6, 448),
                                                      (1, 6, 56), (1, 1, 448)])
def test_select_grid_matches_official_and_brute_force(min_tiles, max_tiles, tile):
    for width, height in itertools.product(SIZES, SIZES):
        got = select_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, tile=tile)
        assert got == official_select_grid(width, height, min_tiles, max_tiles, tile), (width, height)
        assert got == brute_force_grid(width, height, min_tiles, max_tiles, tile), (width, height)


@pytest.mark.parametrize("width,height,max_tiles,expected", [
    # Exact aspect tie 2x1 vs 4x2 (ratio 2): switch only if area > 0.5 * 448^2 * 8 = 802816.
    (896, 448, 8, (2, 1)),
    (1792, 896, 8, (4, 2)),
    # 896x448 with the default max 6: 4x2 is not a candidate.
    (896, 448, 6, (2, 1)),
    # Tie 1x1 vs 2x2 (ratio 1): threshold 0.5 * 448^2 * 4 = 401408 (634^2 = 401956, 633^2 = 400689).
    (634, 634, 6, (2, 2)),
    (633, 633, 6, (1, 1)),
    # Midpoint ties (equal distance, different ratios), 1.5 between 1x1 and 2x1; 0.75 between 1x1 and 1x2.
    (600, 400, 2, (2, 1)),
    (300, 200, 2, (1, 1)),
    (600, 800, 2, (1, 2)),
    (300, 400, 2, (1, 1)),
    # Ratio 1.25 is 0.25 from 1x1, 2x2 and 3x2: thresholds 401408 (2x2) and 602112 (3x2) pick three outcomes.
    (500, 400, 6, (1, 1)),
    (750, 600, 6, (2, 2)),
    (1000, 800, 6, (3, 2)),
])
def test_select_grid_tie_branch(width, height, max_tiles, expected):
    assert select_grid(width, height, max_tiles=max_tiles) == expected
    assert official_select_grid(width, height, 1, max_tiles, 448) == expected


@pytest.mark.parametrize("width,height,expected", [
    (1, 1, (1, 1)), (1, 5000, (1, 6)), (5000, 1, (6, 1)), (3, 1, (3, 1)), (10000, 2, (6, 1)), (448, 448, (1, 1)),
])
def test_select_grid_tiny_and_extreme(width, height, expected):
    assert select_grid(width, height) == expected


def test_select_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="width=0"):
        select_grid(0, 10)
    with pytest.raises(ValueError, match="min_tiles=3, max_tiles=2"):
        select_grid(10, 10, min_tiles=3, max_tiles=2)
    with pytest.raises(ValueError, match="tile=0"):
        select_grid(10, 10, tile=0)


def _test_image(width, height, mode="RGB", seed=0, noise=25.0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255.0 / width, y * 255.0 / height, (3 * x + 5 * y) % 256], -1)
    pixels += rng.normal(0, noise, pixels.shape)
    pixels[height // 4: height // 2, width // 3: width // 2] = (240, 20, 60)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)


@pytest.mark.parametrize("width,height,tile,max_tiles", [(333, 517, 56, 6), (1000, 301, 56, 6), (64, 900, 32, 6),
                                                         (200, 90, 48, 12), (40, 40, 56, 6)])
def test_tiles_match_transformers_got_ocr2(width, height, tile, max_tiles):
    """transformers' GotOcr2 (InternVL) processor implements the same tiling; compare raw uint8 tiles."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    image = _test_image(width, height)
    processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1,
                                         max_patches=max_tiles, do_rescale=False, do_normalize=False)
    reference = processor(image, return_tensors="np")["pixel_values"]
    tiles = tile_image(image, max_tiles=max_tiles, tile=tile)
    cols, rows = select_grid(width, height, max_tiles=max_tiles, tile=tile)
    assert len(tiles) == cols * rows + (cols * rows > 1)
    assert len(tiles) == len(reference)
    for ours, theirs in zip(tiles, reference):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs).transpose(1, 2, 0).astype(np.uint8))


def test_tiles_are_row_major_crops_of_bicubic_resize_with_thumbnail_last():
    image = _test_image(700, 300)
    cols, rows = select_grid(700, 300, tile=64)
    assert (cols, rows) == (2, 1)
    resized = np.asarray(image.resize((64 * cols, 64 * rows)))  # InternVL's call: Pillow's default filter
    tiles = tile_image(image, tile=64)
    for index in range(cols * rows):
        r, c = divmod(index, cols)
        np.testing.assert_array_equal(np.asarray(tiles[index]), resized[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64])
    np.testing.assert_array_equal(np.asarray(tiles[-1]), np.asarray(image.resize((64, 64))))
    assert len(tile_image(image, tile=64, use_thumbnail=False)) == cols * rows


def test_tile_counts_span_one_to_seven():
    counts = set()
    for cols, rows in candidate_grids(1, 6):
        image = Image.new("RGB", (cols * 20, rows * 20))  # small area: exact-ratio ties keep the smaller grid
        tiles = tile_image(image, tile=16)
        assert select_grid(cols * 20, rows * 20, tile=16) == (cols, rows)
        assert len(tiles) == cols * rows + (cols * rows > 1)
        assert all(t.size == (16, 16) and t.mode == "RGB" for t in tiles)
        counts.add(len(tiles))
    assert counts == {1, 3, 4, 5, 6, 7}  # a thumbnail always joins a multi-tile grid, so never 2


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_tile_image_converts_to_rgb(mode):
    tiles = tile_image(_test_image(120, 50, mode=mode), tile=32)
    assert all(t.mode == "RGB" for t in tiles)


def test_tile_image_tiny_inputs():
    assert [t.size for t in tile_image(Image.new("RGB", (1, 1)), tile=16)] == [(16, 16)]
    assert len(tile_image(Image.new("RGB", (1, 1000)), tile=16)) == 7  # 1x6 grid + thumbnail


def test_tiles_per_image_budget():
    assert [tiles_per_image_budget(n) for n in (1, 2, 3, 4, 6, 7, 20)] == [6, 3, 2, 1, 1, 1, 1]
    assert tiles_per_image_budget(2, max_tiles=12) == 6
    # Every image of a multi-image sample respects the budget (thumbnail included: budget + 1 at most).
    image = _test_image(900, 300)
    for n in (1, 2, 3):
        budget = tiles_per_image_budget(n)
        assert len(tile_image(image, max_tiles=budget, tile=32)) <= budget + (budget > 1)
    with pytest.raises(ValueError, match="n_images"):
        tiles_per_image_budget(0)


def _reencode(image, quality):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def test_jpeg_quality_augment_uses_drawn_quality_and_is_seeded():
    image = _test_image(96, 80)
    for seed in range(5):
        expected_quality = int(np.random.default_rng(seed).integers(75, 101))
        out = jpeg_quality_augment(image, np.random.default_rng(seed))
        assert out.mode == "RGB" and out.size == image.size
        np.testing.assert_array_equal(np.asarray(out), _reencode(image, expected_quality))
    smooth = _test_image(96, 80, noise=0.0)
    low = np.asarray(jpeg_quality_augment(smooth, np.random.default_rng(0), quality_range=(5, 5)))
    high = np.asarray(jpeg_quality_augment(smooth, np.random.default_rng(0), quality_range=(100, 100)))
    source = np.asarray(smooth).astype(int)
    assert np.abs(low - source).mean() > 2 * np.abs(high - source).mean()  # lower quality -> more distortion
    assert DEFAULT_JPEG_QUALITY_RANGE == (75, 100)  # InternVL/LEO: range(75, 101)


def test_jpeg_quality_augment_rejects_bad_range():
    with pytest.raises(ValueError, match="quality_range"):
        jpeg_quality_augment(_test_image(8, 8), np.random.default_rng(0), quality_range=(90, 80))
