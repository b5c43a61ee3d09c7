"""Per-encoder preprocessing (uint8 host + device normalisation) vs transformers' PIL image processors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.pix2struct.image_processing_pil_pix2struct import Pix2StructImageProcessorPil
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from leo_jax.data.image_processing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KINDS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    get_preprocessor,
)
from leo_jax.layers.pixels import pil_resample_taps, resize_like_pil

# Host geometry is bit-exact; the device half differs from numpy's (x * 1/255 - mean) / std only by float32
# rounding of the fused multiply-add. One uint8 step is 1/255/std >= 0.0145 after normalisation: we demand 1e-5.
ATOL = 1e-5
SIZES = [(333, 517), (301, 1000), (900, 64), (37, 41)]  # (height, width)


def make_image(height, width, seed=0, mode="RGB"):
    """A real-looking test image: gradients, a few flat shapes, a thin line and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = np.stack([255 * x / width, 255 * y / height, 127 + 127 * np.sin((x + 2 * y) / 9.0)], -1)
    pixels[height // 5: height // 2, width // 4: width // 2] = (250, 30, 40)
    disc = (y - 0.7 * height) ** 2 + (x - 0.6 * width) ** 2 < (0.15 * min(height, width)) ** 2
    pixels[disc] = (20, 200, 90)
    pixels[:, width // 3] = 255
    pixels += rng.normal(0, 12, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        alpha = np.clip(255 * x / width, 0, 255).astype(np.uint8)
        image = Image.fromarray(np.dstack([np.asarray(image), alpha]), "RGBA")
    return image


def ours(kind, image, **options):
    processor = get_preprocessor(kind, **options)
    pixels = processor.host(image)
    assert pixels.dtype == np.uint8 and pixels.shape == processor.output_size + (3,)
    return np.asarray(jax.jit(processor.device)(jnp.asarray(pixels)[None]))[0]


def theirs(processor, image):
    return processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)  # NCHW -> NHWC


HF_CASES = {
    "intern_vit": ({}, lambda: GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, image_mean=IMAGENET_MEAN,
                                                         image_std=IMAGENET_STD)),
    "clip": ({}, lambda: CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})),
    "siglip": ({}, lambda: SiglipImageProcessorPil(size={"height": 384, "width": 384})),
    "convnext": ({}, lambda: ConvNextImageProcessorPil(size={"shortest_edge": 384}, image_mean=IMAGENET_MEAN,
                                                       image_std=IMAGENET_STD)),
    "convnext_crop_pct": ({"shortest_edge": 224, "crop_pct": 0.875},
                          lambda: ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875,
                                                            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)),
    "clip_tiny": ({"shortest_edge": 28, "crop_size": 28},
                  lambda: CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})),
    # Crop larger than the resized image: transformers zero-pads (in uint8, before normalising).
    "clip_padded_crop": ({"shortest_edge": 20, "crop_size": 24},
                         lambda: CLIPImageProcessorPil(size={"shortest_edge": 20},
                                                       crop_size={"height": 24, "width": 24})),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
@pytest.mark.parametrize("height,width", SIZES)
def test_matches_transformers(case, height, width):
    options, make_reference = HF_CASES[case]
    kind = case.split("_")[0] if not case.startswith("intern_vit") else "intern_vit"
    image = make_image(height, width)
    expected = theirs(make_reference(), image)
    got = ours(kind, image, **options)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("height,width", SIZES + [(448, 448)])
def test_sam_matches_transformers_including_zero_padding(height, width):
    image = make_image(height, width, seed=1)
    expected = theirs(SamImageProcessorPil(), image)
    sam = get_preprocessor("sam")
    pixels = sam.host(image)
    valid = jnp.asarray([sam.resized_size(height, width)])
    got = np.asarray(jax.jit(sam.device)(jnp.asarray(pixels)[None], valid_hw=valid))[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    h, w = sam.resized_size(height, width)
    assert np.all(got[h:] == 0) and np.all(got[:, w:] == 0)


def test_sam_small_config_and_batched_valid_sizes():
    sam = get_preprocessor("sam", longest_edge=64, pad_size=64)
    reference = SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    images = [make_image(30, 50, seed=2), make_image(90, 20, seed=3)]
    pixels = jnp.asarray(np.stack([sam.host(im) for im in images]))
    valid = jnp.asarray([sam.resized_size(im.height, im.width) for im in images])
    got = np.asarray(sam.device(pixels, valid_hw=valid))
    for index, image in enumerate(images):
        np.testing.assert_allclose(got[index], theirs(reference, image), rtol=0, atol=ATOL)


@pytest.mark.parametrize("tile,longest_edge,pad", [(448, 1024, 1024), (56, 128, 128), (56, 128, 160)])
def test_sam_device_resize_from_tiles_is_exact(tile, longest_edge, pad):
    """LEO's SAM input: each square tile enlarged to 1024 (bilinear). Building it on device equals the host path."""
    sam = get_preprocessor("sam", longest_edge=longest_edge, pad_size=pad)
    tiles = [make_image(tile, tile, seed=s) for s in range(2)]
    host = np.stack([sam.host(t) for t in tiles])
    valid = jnp.asarray([sam.resized_size(tile, tile)] * 2)
    via_host = np.asarray(sam.device(jnp.asarray(host), valid_hw=valid))
    small = jnp.asarray(np.stack([np.asarray(t) for t in tiles]))
    via_device = np.asarray(jax.jit(sam.device_from_small)(small))
    np.testing.assert_allclose(via_device, via_host, rtol=0, atol=ATOL)  # float32 FMA rounding only
    resized = np.asarray(resize_like_pil(small, (longest_edge, longest_edge), "bilinear"))
    np.testing.assert_array_equal(resized, host[:, :longest_edge, :longest_edge])  # the uint8 pixels are identical
    if tile == 448:
        np.testing.assert_allclose(via_host[0], theirs(SamImageProcessorPil(), tiles[0]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
@pytest.mark.parametrize("src,dst", [((448, 448), (1024, 1024)), ((37, 23), (90, 23)), ((5, 7), (64, 200)),
                                     ((16, 16), (16, 40))])
def test_resize_like_pil_bit_exact(resample, src, dst):
    pixels = np.asarray(make_image(*src, seed=4))
    expected = np.asarray(Image.fromarray(pixels).resize(dst[::-1], getattr(Image.Resampling, resample.upper())))
    got = np.asarray(jax.jit(lambda x: resize_like_pil(x, dst, resample))(jnp.asarray(pixels)))
    np.testing.assert_array_equal(got, expected)


def test_resize_like_pil_rejects_shrinking_and_float():
    with pytest.raises(ValueError, match="only enlarges"):
        resize_like_pil(jnp.zeros((10, 10, 3), jnp.uint8), (5, 10))
    with pytest.raises(TypeError, match="uint8"):
        resize_like_pil(jnp.zeros((10, 10, 3), jnp.float32), (20, 20))


def test_pil_resample_taps_weights_sum_to_one_in_fixed_point():
    for src, dst in [(448, 1024), (1000, 333), (7, 300)]:
        _, weights = pil_resample_taps(src, dst, int(Image.Resampling.BICUBIC))
        assert np.all(np.abs(weights.sum(axis=1) - (1 << 22)) <= weights.shape[1])


def timm_eval_reference(image, size=336):
    """timm eval transform as torchvision computes it: Resize(size) on the short side (long side floored),
    bicubic; CenterCrop(size) with offsets int(round((H - size) / 2)); ToTensor; Normalize(OpenAI CLIP)."""
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    crop = resized[top:top + size, left:left + size].astype(np.float32) / 255.0
    return (crop - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)


@pytest.mark.parametrize("height,width", SIZES + [(336, 339), (341, 336)])
def test_eva02_matches_timm_eval_transform(height, width):
    image = make_image(height, width, seed=5)
    np.testing.assert_allclose(ours("eva02", image), timm_eval_reference(image), rtol=0, atol=ATOL)


def test_eva02_crop_rounds_half_to_even_like_torchvision():
    # 339 wide after resizing: torchvision crops from round(1.5) = 2, transformers from 3 // 2 = 1.
    image = make_image(336, 339, seed=6)
    cropped = get_preprocessor("eva02").host(image)
    np.testing.assert_array_equal(cropped, np.asarray(image)[:, 2:338])


@pytest.mark.parametrize("height,width,max_patches,patch", [(333, 517, 576, 16), (301, 1000, 576, 16),
                                                            (900, 64, 64, 16), (20, 30, 100, 8), (5, 300, 16, 4)])
def test_pix2struct_matches_transformers(height, width, max_patches, patch):
    image = make_image(height, width, seed=7)
    reference = Pix2StructImageProcessorPil(max_patches=max_patches, patch_size={"height": patch, "width": patch})
    expected = reference(image, return_tensors="np")
    got = get_preprocessor("pix2struct", max_patches=max_patches, patch_size=patch).host(image)
    assert got["flattened_patches"].shape == (max_patches, 2 + 3 * patch * patch)
    np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"][0])
    np.testing.assert_array_equal(got["flattened_patches"][:, :2], expected["flattened_patches"][0][:, :2])
    np.testing.assert_allclose(got["flattened_patches"], expected["flattened_patches"][0], rtol=0, atol=ATOL)


def test_pix2struct_constant_image_uses_std_floor():
    image = Image.new("RGB", (40, 40), (90, 90, 90))
    expected = Pix2StructImageProcessorPil(max_patches=16)(image, return_tensors="np")["flattened_patches"][0]
    got = get_preprocessor("pix2struct", max_patches=16).host(image)["flattened_patches"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["clip", "siglip", "sam", "convnext"])
def test_alpha_is_composited_onto_white_like_transformers(kind):
    image = make_image(120, 90, seed=8, mode="RGBA")
    reference = {"clip": HF_CASES["clip"][1], "siglip": HF_CASES["siglip"][1], "sam": SamImageProcessorPil,
                 # ConvNext's processor leaves do_convert_rgb unset (RGBA input would fail); we always convert.
                 "convnext": lambda: ConvNextImageProcessorPil(size={"shortest_edge": 384}, do_convert_rgb=True,
                                                               image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
                 }[kind]()
    processor = get_preprocessor(kind)
    pixels = jnp.asarray(processor.host(image))[None]
    if kind == "sam":
        got = processor.device(pixels, valid_hw=jnp.asarray([processor.resized_size(120, 90)]))[0]
    else:
        got = processor.device(pixels)[0]
    np.testing.assert_allclose(np.asarray(got), theirs(reference, image), rtol=0, atol=ATOL)


def test_intern_vit_drops_alpha_like_internvl():
    image = make_image(60, 80, seed=9, mode="RGBA")
    expected = np.asarray(image.convert("RGB").resize((448, 448), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(get_preprocessor("intern_vit").host(image), expected)


@pytest.mark.parametrize("kind", ["clip", "intern_vit", "eva02"])
def test_numpy_and_grayscale_inputs(kind):
    image = make_image(70, 110, seed=10)
    processor = get_preprocessor(kind)
    np.testing.assert_array_equal(processor.host(np.asarray(image)), processor.host(image))
    gray = image.convert("L")
    np.testing.assert_array_equal(processor.host(np.asarray(gray)), processor.host(gray))
    np.testing.assert_array_equal(processor.host(np.asarray(gray)[..., None]), processor.host(gray))


def test_device_is_jittable_batched_and_casts():
    clip = get_preprocessor("clip", shortest_edge=28, crop_size=28)
    batch = np.stack([clip.host(make_image(50, 40, seed=s)) for s in range(3)])[None]  # [1, 3, 28, 28, 3]
    full = jax.jit(clip.device)(jnp.asarray(batch))
    half = jax.jit(lambda x: clip.device(x, jnp.bfloat16))(jnp.asarray(batch))
    assert full.shape == batch.shape and full.dtype == jnp.float32 and half.dtype == jnp.bfloat16
    expected = (batch / 255.0 - np.asarray(OPENAI_CLIP_MEAN)) / np.asarray(OPENAI_CLIP_STD)
    np.testing.assert_allclose(np.asarray(full), expected, rtol=0, atol=ATOL)


def test_defaults_follow_published_checkpoints():
    sizes = {kind: get_preprocessor(kind).output_size for kind in KINDS if kind != "pix2struct"}
    assert sizes == {"intern_vit": (448, 448), "sam": (1024, 1024), "clip": (336, 336), "siglip": (384, 384),
                     "eva02": (336, 336), "convnext": (384, 384)}
    assert get_preprocessor("pix2struct").max_patches == 576


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown image preprocessor kind 'vit'.*intern_vit"):
        get_preprocessor("vit")
    with pytest.raises(TypeError, match="bad options.*'clip'"):
        get_preprocessor("clip", longest_edge=3)
    with pytest.raises(TypeError, match="uint8"):
        get_preprocessor("clip").host(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="channels last"):
        get_preprocessor("clip").host(np.zeros((3, 4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="pad_size"):
        get_preprocessor("sam", longest_edge=64, pad_size=32)
    with pytest.raises(ValueError, match="crop_pct"):
        get_preprocessor("convnext", shortest_edge=224, crop_pct=1.5)
    with pytest.raises(ValueError, match=r"\[..., H, W, 3\]"):
        get_preprocessor("clip").device(jnp.zeros((2, 8, 8, 4), jnp.uint8))


def test_leo_image_inputs_jpeg_only_on_intern_vit_tiles():
    from leo_jax.data.image_processing import leo_image_inputs
    from leo_jax.data.tiling import jpeg_quality_augment, tile_image

    image = make_image(90, 200, seed=11)
    plain = [np.asarray(t) for t in tile_image(image, max_tiles=6, tile=32)]
    out = leo_image_inputs(image, max_tiles=6, tile=32, jpeg_rng=np.random.default_rng(3))
    assert out["tiles"].shape == out["sam_tiles"].shape == (len(plain), 32, 32, 3)
    assert out["tiles"].dtype == out["sam_tiles"].dtype == np.uint8
    np.testing.assert_array_equal(out["sam_tiles"], np.stack(plain))  # SAM sees the un-augmented tiles
    rng = np.random.default_rng(3)
    expected = [np.asarray(jpeg_quality_augment(Image.fromarray(t), rng)) for t in plain]
    np.testing.assert_array_equal(out["tiles"], np.stack(expected))
    assert not np.array_equal(out["tiles"], out["sam_tiles"])

    sam = get_preprocessor("sam", longest_edge=64)
    hosted = leo_image_inputs(image, max_tiles=6, tile=32, sam=sam)
    np.testing.assert_array_equal(hosted["tiles"], np.stack(plain))  # no rng: no augmentation
    np.testing.assert_array_equal(hosted["sam_tiles"], np.stack([sam.host(Image.fromarray(t)) for t in plain]))


def test_normalize_is_the_two_step_formula_for_any_mean_std():
    """layers.pixels.normalize (used by the models with their encoder config's pixel_mean / pixel_std) equals
    (x / 255 - mean) / std up to float32 rounding."""
    from leo_jax.layers.pixels import normalize

    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.7)
    pixels = np.random.RandomState(0).randint(0, 256, (2, 5, 7, 3), np.uint8)
    got = np.asarray(jax.jit(lambda x: normalize(x, mean, std))(jnp.asarray(pixels)))
    expected = (pixels / 255.0 - np.asarray(mean)) / np.asarray(std)
    assert got.dtype == np.float32 and np.abs(got - expected).max() < ATOL


def test_encoder_configs_own_their_pixel_normalisation():
    """Encoder configs carry their checkpoint's mean/std; a LEO-MINI expert's processor may not set another."""
    from leo_jax.models.leo_mini import VisionExpertConfig
    from leo_jax.models.vision.clip import CLIPVisionConfig
    from leo_jax.models.vision.siglip import SiglipVisionConfig

    assert CLIPVisionConfig().pixel_mean == OPENAI_CLIP_MEAN and CLIPVisionConfig().pixel_std == OPENAI_CLIP_STD
    assert SiglipVisionConfig().pixel_mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"pixel_mean/pixel_std: std values must be positive"):
        CLIPVisionConfig(pixel_std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match=r"experts\.clip\.processor sets \['mean'\].*encoder\.pixel_mean"):
        VisionExpertConfig(name="clip", kind="clip_vision", encoder={}, processor={"kind": "clip", "mean": (0, 0, 0)})
