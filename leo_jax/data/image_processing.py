"""Per-encoder image preprocessing, split into a uint8 host half and a jit-friendly device half.

Each vision encoder expects the pixels its published checkpoint was trained with. The geometric part (RGB
conversion, resize, crop, pad) runs on the host in uint8 through PIL, exactly as the transformers "slow"
image processors do (they also convert to PIL, resize, and convert back), so host outputs equal theirs
bit for bit. The arithmetic part (rescale by 1/255, mean/std normalisation) runs on the accelerator in
``Preprocessor.device``; it is one fused multiply-add, so the only difference from transformers is float32
rounding (< 1e-6, far below one uint8 step). Shipping uint8 instead of float32 also cuts host->device
traffic by 4x.

Pix2Struct is the exception: its processor standardises each image by its own mean/std and resamples in
float, so its host half returns float32 flattened patches, as transformers does (equal to ~5e-7).

Deliberate differences from transformers: EVA-02 has no transformers processor; it follows timm's eval
transform, whose torchvision CenterCrop rounds the offset half-to-even where transformers floors (1 px shift
for some odd margins). ConvNext's transformers processor does not convert to RGB by default (RGBA input fails
there); every kind here converts, compositing alpha onto white as transformers' convert_to_rgb does, except
intern_vit which drops alpha like InternVL's ``img.convert('RGB')``.

Kinds and defaults (each an option of ``get_preprocessor``, so tiny configs can use small sizes):

=========== ====================================================== ===============================
kind        geometry (PIL filter)                                  normalisation
=========== ====================================================== ===============================
intern_vit  resize to 448x448 (bicubic), as InternVL / LEO         ImageNet mean/std
sam         longest side -> 1024 (bilinear), pad bottom/right 1024 ImageNet mean/std, pad = 0 after
clip        shortest side -> 336 (bicubic), centre crop 336        OpenAI CLIP mean/std
siglip      resize to 384x384 (bicubic)                            0.5 / 0.5
eva02       timm eval: shortest side -> floor(336/crop_pct=1.0)    OpenAI CLIP mean/std
            (bicubic), torchvision centre crop 336
convnext    HF ConvNext: shortest_edge 384 -> warp to 384x384;     ImageNet mean/std
            below 384 resize to shortest_edge/crop_pct + crop
pix2struct  per-image standardisation, aspect-preserving antialiased (per image, float32 on host)
            bilinear resize to <= 576 patches of 16x16
=========== ====================================================== ===============================
"""
from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from leo_jax.data.tiling import DEFAULT_JPEG_QUALITY_RANGE, jpeg_quality_augment, tile_image
from leo_jax.layers.pixels import (
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    check_mean_std,
    longest_edge_padded,
    longest_edge_size,
    normalize,
    normalize_factors,
    zero_outside,
)

if TYPE_CHECKING:  # the device halves import JAX when called: the host halves serve JAX-free code too
    import jax

BICUBIC = Image.Resampling.BICUBIC
BILINEAR = Image.Resampling.BILINEAR
_RESAMPLE_BY_NAME = {"bicubic": BICUBIC, "bilinear": BILINEAR, "nearest": Image.Resampling.NEAREST,
                     "lanczos": Image.Resampling.LANCZOS}


def _resample_filter(resample: str | int) -> Image.Resampling:
    if isinstance(resample, str):
        if resample not in _RESAMPLE_BY_NAME:
            raise ValueError(f"resample={resample!r} is not one of {sorted(_RESAMPLE_BY_NAME)}")
        return _RESAMPLE_BY_NAME[resample]
    return Image.Resampling(resample)


def to_rgb_image(image: Image.Image | np.ndarray, alpha_onto_white: bool = True) -> Image.Image:
    """An RGB PIL image from a PIL image or a uint8 array (HxW, HxWx1/3/4).

    ``alpha_onto_white`` composites transparency onto white as transformers' ``convert_to_rgb`` does; InternVL /
    LEO instead call ``img.convert('RGB')`` (alpha dropped), which ``alpha_onto_white=False`` reproduces.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 (H, W[, C]), got dtype {image.dtype}; convert with "
                            "np.clip(x, 0, 255).astype(np.uint8) first")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4 (channels last), got {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if alpha_onto_white and ("A" in image.getbands() or image.info.get("transparency") is not None):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(h, w) after scaling the short side to ``shortest_edge`` (torchvision / transformers rule: long side floors)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(image: Image.Image, height: int, width: int, rounding: str = "floor") -> Image.Image:
    """Centre crop to (height, width); zero-fills when the crop is larger than the image.

    ``rounding='floor'``: offsets ``(H - h) // 2`` (transformers). ``rounding='round'``: ``round((H - h) / 2)``
    with Python's round-half-even (torchvision ``CenterCrop``, used by timm). PIL's crop fills outside pixels
    with 0, which is exactly where transformers pads when the crop exceeds the image.
    """
    in_width, in_height = image.size
    if rounding == "floor":
        top, left = (in_height - height) // 2, (in_width - width) // 2
    elif rounding == "round":
        if height > in_height or width > in_width:
            raise ValueError(f"torchvision-style crop {height}x{width} is larger than the image {in_height}x{in_width}")
        top, left = int(round((in_height - height) / 2.0)), int(round((in_width - width) / 2.0))
    else:
        raise ValueError(f"rounding must be 'floor' or 'round', got {rounding!r}")
    if (top, left, height, width) == (0, 0, in_height, in_width):
        return image
    return image.crop((left, top, left + width, top + height))


class Preprocessor(abc.ABC):
    """uint8 host geometry + on-device rescale/normalise for one encoder kind.

    Subclasses implement ``_geometry`` (PIL RGB image in, PIL RGB image out, at ``output_size``).
    """

    kind: str = ""
    alpha_onto_white = True

    def __init__(self, output_size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 rescale_factor: float = 1 / 255):
        check_mean_std(mean, std, self.kind)
        self.output_size = (int(output_size[0]), int(output_size[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.rescale_factor = float(rescale_factor)
        self._scale, self._offset = normalize_factors(self.mean, self.std, self.rescale_factor)

    @abc.abstractmethod
    def _geometry(self, image: Image.Image) -> Image.Image:
        """Resize/crop/pad an RGB image to ``output_size``."""

    def host_image(self, image: Image.Image | np.ndarray) -> Image.Image:
        """The resized/cropped/padded RGB PIL image (before conversion to an array)."""
        return self._geometry(to_rgb_image(image, self.alpha_onto_white))

    def host(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] ready for ``device`` (one copy: PIL buffer -> numpy)."""
        return np.asarray(self.host_image(image))

    def settings(self) -> dict:
        """What an exported model's preprocessor_config.json records: the geometry (``_geometry_settings``), then
        rescale and mean/std, in Hugging Face image-processor names."""
        return {"kind": self.kind, **self._geometry_settings(), "rescale_factor": self.rescale_factor,
                "image_mean": list(self.mean), "image_std": list(self.std)}

    @abc.abstractmethod
    def _geometry_settings(self) -> dict:
        """The resize / crop / pad rule and its sizes."""

    def device(self, pixels: jax.Array, dtype: Any = "float32") -> jax.Array:
        """Rescale and normalise uint8 pixels [..., H, W, 3] (NHWC) on device, as transformers does on host."""
        if pixels.shape[-1] != 3:
            raise ValueError(f"{self.kind}: expected channels-last RGB pixels [..., H, W, 3], got {pixels.shape}")
        return normalize(pixels, self.mean, self.std, self.rescale_factor, dtype)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """``device`` in numpy, for consumers without JAX (the PyTorch processor): float32 [..., H, W, 3]."""
        if pixels.shape[-1] != 3:
            raise ValueError(f"{self.kind}: expected channels-last RGB pixels [..., H, W, 3], got {pixels.shape}")
        return pixels.astype(np.float32) * self._scale + self._offset


class ResizePreprocessor(Preprocessor):
    """Resize straight to (height, width), ignoring aspect ratio (InternViT, SigLIP, ConvNeXt >= 384)."""

    def __init__(self, kind: str, size: int | tuple[int, int], resample: str | int, mean, std,
                 alpha_onto_white: bool = True, rescale_factor: float = 1 / 255):
        self.kind = kind
        self.alpha_onto_white = alpha_onto_white
        height, width = (size, size) if isinstance(size, int) else size
        super().__init__((height, width), mean, std, rescale_factor)
        self.resample = _resample_filter(resample)

    def _geometry_settings(self) -> dict:
        height, width = self.output_size
        return {"resize": "resize", "size": {"height": height, "width": width},
                "resample": self.resample.name.lower()}

    def _geometry(self, image: Image.Image) -> Image.Image:
        height, width = self.output_size
        if image.size == (width, height):
            return image  # PIL's resize to the same size is a plain copy (e.g. InternViT on 448 tiles)
        return image.resize((width, height), self.resample)


class ShortestEdgeCropPreprocessor(Preprocessor):
    """Scale the short side to ``shortest_edge`` then centre crop (CLIP; timm eval for EVA-02; ConvNeXt < 384)."""

    def __init__(self, kind: str, shortest_edge: int, crop_size: int | tuple[int, int], resample: str | int,
                 mean, std, crop_rounding: str = "floor", rescale_factor: float = 1 / 255):
        self.kind = kind
        crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        super().__init__(crop, mean, std, rescale_factor)
        if shortest_edge < 1:
            raise ValueError(f"{kind}: shortest_edge must be >= 1, got {shortest_edge}")
        self.shortest_edge = int(shortest_edge)
        self.resample = _resample_filter(resample)
        self.crop_rounding = crop_rounding

    def _geometry_settings(self) -> dict:
        height, width = self.output_size
        return {"resize": "shortest_edge_then_center_crop", "size": {"shortest_edge": self.shortest_edge},
                "crop_size": {"height": height, "width": width}, "crop_rounding": self.crop_rounding,
                "resample": self.resample.name.lower()}

    def _geometry(self, image: Image.Image) -> Image.Image:
        height, width = shortest_edge_size(image.height, image.width, self.shortest_edge)
        resized = image.resize((width, height), self.resample)
        return center_crop(resized, *self.output_size, rounding=self.crop_rounding)


class SamPreprocessor(Preprocessor):
    """SAM: long side to ``longest_edge`` (bilinear), zero-pad bottom/right to ``pad_size``.

    transformers pads *after* normalising, so padded pixels are exactly 0 in the model input. The host pads the
    uint8 image with 0, and ``device`` zeroes the padded region again after normalising; for that it needs each
    image's resized size (``resized_size``), which is the full square for LEO's square tiles (the default).
    """

    kind = "sam"

    def __init__(self, longest_edge: int = 1024, pad_size: int | None = None, resample: str | int = "bilinear",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, rescale_factor: float = 1 / 255):
        pad = longest_edge if pad_size is None else pad_size
        if pad < longest_edge:
            raise ValueError(f"sam: pad_size ({pad}) must be >= longest_edge ({longest_edge})")
        super().__init__((pad, pad), mean, std, rescale_factor)
        self.longest_edge = int(longest_edge)
        self.resample = _resample_filter(resample)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the un-padded image content for an input of ``height x width``."""
        return longest_edge_size(height, width, self.longest_edge)

    def _geometry_settings(self) -> dict:
        pad_h, pad_w = self.output_size
        return {"resize": "longest_edge_then_pad", "size": {"longest_edge": self.longest_edge},
                "pad_size": {"height": pad_h, "width": pad_w}, "padding": "bottom_right_zeros_after_normalize",
                "resample": self.resample.name.lower()}

    def _geometry(self, image: Image.Image) -> Image.Image:
        height, width = self.resized_size(image.height, image.width)
        resized = image.resize((width, height), self.resample)
        pad_h, pad_w = self.output_size
        if (height, width) == (pad_h, pad_w):
            return resized
        return resized.crop((0, 0, pad_w, pad_h))  # PIL fills outside pixels with 0: bottom/right zero padding

    def device(self, pixels: jax.Array, dtype: Any = "float32", valid_hw: jax.Array | None = None) -> jax.Array:
        """Normalise, then zero everything outside each image's ``valid_hw`` [..., 2] (h, w) region."""
        import jax.numpy as jnp

        x = super().device(pixels, jnp.float32)
        return (x if valid_hw is None else zero_outside(x, valid_hw)).astype(dtype)

    def device_from_small(self, pixels: jax.Array, dtype: Any = "float32") -> jax.Array:
        """SAM input built on device from uint8 images no larger than ``longest_edge`` (LEO: the 448 px tiles):
        equals ``device(host(image))`` while moving ~5x fewer bytes host->device for 448 -> 1024 tiles."""
        return longest_edge_padded(pixels, self.longest_edge, self.output_size[0], self.mean, self.std,
                                   self.resample, self.rescale_factor, dtype)


@functools.lru_cache(maxsize=256)
def _antialiased_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights [out_size, taps] of torch's antialiased bilinear resampling along one axis.

    Mirrors ``_compute_indices_min_size_weights_aa`` in PyTorch's CPU UpSampleKernel.cpp, including its float32 /
    float64 mix, so the resampled values agree with ``F.interpolate(..., 'bilinear', antialias=True)`` to float32
    rounding. (PIL's float BILINEAR uses the same filter but double-precision weights: ~1e-4 apart after
    standardisation.) Unused taps point at a valid index with weight 0.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    support = scale if scale >= 1.0 else f32(1.0)
    inv_scale = f32(1.0 / float(scale)) if scale >= 1.0 else f32(1.0)
    taps = int(math.ceil(float(support))) * 2 + 1
    center = (float(scale) * (np.arange(out_size) + 0.5)).astype(f32)
    xmin = np.maximum(((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    xmax = np.minimum(((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size)
    offsets = np.arange(taps)
    used = offsets[None, :] < (xmax - xmin)[:, None]
    source = xmin[:, None] + offsets[None, :]
    arg = (((source.astype(f32) - center[:, None]).astype(np.float64) + 0.5) * float(inv_scale)).astype(f32)
    arg = np.abs(arg)
    weights = np.where(used & (arg < 1.0), f32(1.0) - arg, f32(0.0)).astype(f32)
    total = np.zeros(out_size, f32)
    for tap in range(taps):  # sequential float32 sum, as the C++ loop
        total = total + weights[:, tap]
    weights = np.where(total[:, None] != 0, weights / np.where(total == 0, f32(1), total)[:, None], weights)
    return np.where(used, source, xmin[:, None]), weights.astype(f32)


def _resample_antialiased_bilinear(image: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    """[H, W, C] (uint8 or float) -> float32 [out_height, out_width, C]; width pass then height pass, as torch."""
    def one_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
        if x.shape[axis] == out_size:
            return x
        index, weight = _antialiased_bilinear_taps(x.shape[axis], out_size)
        shape = [1] * x.ndim
        shape[axis] = out_size
        out = np.take(x, index[:, 0], axis=axis) * weight[:, 0].reshape(shape)
        for tap in range(1, index.shape[1]):
            out += np.take(x, index[:, tap], axis=axis) * weight[:, tap].reshape(shape)
        return out

    return one_axis(one_axis(image, 1, out_width), 0, out_height).astype(np.float32, copy=False)


class Pix2StructPreprocessor:
    """Pix2Struct flattened patches [max_patches, 2 + p*p*3] with 1-based (row, col) ids, as transformers.

    As transformers: standardise the image by its own mean/std (std floored at 1/sqrt(#values)), then resize it,
    aspect ratio kept, to the largest grid of ``patch x patch`` patches with at most ``max_patches`` patches,
    with antialiased bilinear resampling (torch's, reproduced in numpy), and flatten each patch (row, col, channel).
    """

    kind = "pix2struct"

    def __init__(self, max_patches: int = 576, patch_size: int = 16):
        if max_patches < 1 or patch_size < 1:
            raise ValueError(f"pix2struct: max_patches and patch_size must be >= 1, got {max_patches}, {patch_size}")
        self.max_patches = int(max_patches)
        self.patch_size = int(patch_size)
        self.patch_dim = 2 + 3 * self.patch_size**2

    def settings(self) -> dict:
        """What an exported model's preprocessor_config.json records (transformers' Pix2StructImageProcessor names)."""
        return {"kind": self.kind, "resize": "max_patches_keep_aspect", "max_patches": self.max_patches,
                "patch_size": {"height": self.patch_size, "width": self.patch_size}, "do_normalize": True,
                "normalize": "per_image_mean_std"}

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of patches for an image of ``height x width`` (transformers' rule)."""
        p, n = self.patch_size, self.max_patches
        scale = (n * (p / height) * (p / width)) ** 0.5
        rows = max(min(int(scale * height / p), n), 1)
        cols = max(min(int(scale * width / p), n), 1)
        return rows, cols

    def host(self, image: Image.Image | np.ndarray) -> dict[str, np.ndarray]:
        pixels = np.asarray(to_rgb_image(image))
        # Mean/std from exact integer sums of the uint8 values (no float copy of the full-size image).
        flat = pixels.reshape(-1)
        total = int(np.add.reduce(flat, dtype=np.uint64))
        total_sq = int(np.add.reduce(flat.astype(np.uint32) ** 2, dtype=np.uint64))
        mean = total / flat.size
        std = max(math.sqrt(max(total_sq / flat.size - mean * mean, 0.0)), 1.0 / math.sqrt(flat.size))
        rows, cols = self.grid(*pixels.shape[:2])
        p = self.patch_size
        # Resampling is linear with weights summing to 1, so standardising after it equals transformers'
        # standardise-then-resample up to float32 rounding, and touches rows*cols*p*p pixels instead of H*W.
        resized = _resample_antialiased_bilinear(pixels, rows * p, cols * p)
        resized = (resized - np.float32(mean)) / np.float32(std)
        patches = resized.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, 3 * p * p)
        n = rows * cols
        out = np.zeros((self.max_patches, self.patch_dim), np.float32)
        out[:n, 0] = np.repeat(np.arange(1, rows + 1, dtype=np.float32), cols)
        out[:n, 1] = np.tile(np.arange(1, cols + 1, dtype=np.float32), rows)
        out[:n, 2:] = patches
        # transformers derives the mask as `patches.sum(-1) != 0`; real patches carry row/col ids >= 1, so that
        # is the first rows*cols entries (stated structurally rather than through a float sum).
        mask = np.zeros((self.max_patches,), np.float32)
        mask[:n] = 1.0
        return {"flattened_patches": out, "attention_mask": mask}

    def device(self, patches: jax.Array, dtype: Any = "float32") -> jax.Array:
        """Patches are already standardised on the host; only cast."""
        import jax.numpy as jnp

        return jnp.asarray(patches).astype(dtype)


def _convnext(shortest_edge: int = 384, crop_pct: float = 224 / 256, resample: str | int = "bicubic",
              mean=IMAGENET_MEAN, std=IMAGENET_STD, rescale_factor: float = 1 / 255) -> Preprocessor:
    """transformers ConvNext rule: below 384 resize to shortest_edge/crop_pct then crop; else warp to a square."""
    if shortest_edge < 384:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"convnext: crop_pct must be in (0, 1], got {crop_pct}")
        return ShortestEdgeCropPreprocessor("convnext", int(shortest_edge / crop_pct), shortest_edge, resample,
                                            mean, std, "floor", rescale_factor)
    return ResizePreprocessor("convnext", shortest_edge, resample, mean, std, True, rescale_factor)


def _eva02(size: int = 336, crop_pct: float = 1.0, resample: str | int = "bicubic", mean=OPENAI_CLIP_MEAN,
           std=OPENAI_CLIP_STD, rescale_factor: float = 1 / 255) -> Preprocessor:
    """timm eval transform for ``eva02_large_patch14_clip_336``: data config input_size 336, crop_pct 1.0,
    interpolation bicubic, crop_mode 'center', OpenAI CLIP mean/std -> Resize(floor(336 / crop_pct)) on the short
    side, then torchvision CenterCrop(336) (offsets rounded half-even)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"eva02: crop_pct must be in (0, 1], got {crop_pct}")
    return ShortestEdgeCropPreprocessor("eva02", math.floor(size / crop_pct), size, resample, mean, std, "round",
                                        rescale_factor)


def _intern_vit(size: int = 448, resample: str | int = "bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                rescale_factor: float = 1 / 255) -> Preprocessor:
    # InternVL's build_transform: img.convert('RGB') (alpha dropped), Resize((448, 448), BICUBIC), ToTensor, Normalize.
    return ResizePreprocessor("intern_vit", size, resample, mean, std, False, rescale_factor)


def _clip(shortest_edge: int = 336, crop_size: int = 336, resample: str | int = "bicubic", mean=OPENAI_CLIP_MEAN,
          std=OPENAI_CLIP_STD, rescale_factor: float = 1 / 255) -> Preprocessor:
    return ShortestEdgeCropPreprocessor("clip", shortest_edge, crop_size, resample, mean, std, "floor", rescale_factor)


def _siglip(size: int | tuple[int, int] = 384, resample: str | int = "bicubic", mean=HALF_MEAN, std=HALF_STD,
            rescale_factor: float = 1 / 255) -> Preprocessor:
    return ResizePreprocessor("siglip", size, resample, mean, std, True, rescale_factor)


_FACTORIES: dict[str, Callable[..., Any]] = {
    "intern_vit": _intern_vit,
    "sam": SamPreprocessor,
    "clip": _clip,
    "siglip": _siglip,
    "eva02": _eva02,
    "convnext": _convnext,
    "pix2struct": Pix2StructPreprocessor,
}
KINDS = tuple(_FACTORIES)


def from_settings(settings: dict, where: str = "preprocessor_config.json") -> Preprocessor | Pix2StructPreprocessor:
    """The preprocessor whose ``settings()`` are ``settings`` (an exported preprocessor_config.json entry)."""
    try:
        kind, resize = settings["kind"], settings["resize"]
        if kind == "pix2struct":
            return Pix2StructPreprocessor(settings["max_patches"], settings["patch_size"]["height"])
        common = dict(resample=settings["resample"], mean=settings["image_mean"], std=settings["image_std"],
                      rescale_factor=settings["rescale_factor"])
        if resize == "resize":
            size = (settings["size"]["height"], settings["size"]["width"])
            return ResizePreprocessor(kind, size, alpha_onto_white=kind != "intern_vit", **common)
        if resize == "shortest_edge_then_center_crop":
            crop = (settings["crop_size"]["height"], settings["crop_size"]["width"])
            return ShortestEdgeCropPreprocessor(kind, settings["size"]["shortest_edge"], crop,
                                                crop_rounding=settings["crop_rounding"], **common)
        if resize == "longest_edge_then_pad":
            return SamPreprocessor(settings["size"]["longest_edge"], settings["pad_size"]["height"], **common)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{where}: preprocessor settings {settings} lack or mistype {err}") from err
    raise ValueError(f"{where}: unknown resize rule {resize!r} for preprocessor kind {kind!r} (expected one written "
                     "by leo_jax.data.image_processing: resize, shortest_edge_then_center_crop, longest_edge_then_pad, "
                     "max_patches_keep_aspect)")


def get_preprocessor(kind: str, **options) -> Preprocessor | Pix2StructPreprocessor:
    """The preprocessor for encoder ``kind`` (one of ``KINDS``); ``options`` override the checkpoint defaults."""
    if kind not in _FACTORIES:
        raise ValueError(f"unknown image preprocessor kind {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        return _FACTORIES[kind](**options)
    except TypeError as err:
        raise TypeError(f"bad options {sorted(options)} for image preprocessor {kind!r}: {err}") from err


def leo_image_inputs(
    image: Image.Image | np.ndarray,
    *,
    max_tiles: int = 6,
    tile: int = 448,
    min_tiles: int = 1,
    use_thumbnail: bool = True,
    jpeg_rng: np.random.Generator | None = None,
    jpeg_quality_range: tuple[int, int] = DEFAULT_JPEG_QUALITY_RANGE,
    sam: SamPreprocessor | None = None,
) -> dict[str, np.ndarray]:
    """LEO's host work for one image: {'tiles': uint8 [n, tile, tile, 3], 'sam_tiles': uint8 [n, s, s, 3]}.

    'tiles' feed InternViT (its preprocessing is the identity on tile-size inputs) and are JPEG re-encoded when
    ``jpeg_rng`` is given (training). SAM sees the un-augmented tiles, as in official LEO. With ``sam=None``
    (recommended) 'sam_tiles' are those tiles at tile size, enlarged on the accelerator by
    ``SamPreprocessor.device_from_small``; with a ``SamPreprocessor`` they are resized/padded here (s = 1024).
    Without augmentation and host SAM both entries are the same array (treat them as read-only).
    """
    tiles = tile_image(to_rgb_image(image, alpha_onto_white=False), max_tiles=max_tiles, tile=tile,
                       min_tiles=min_tiles, use_thumbnail=use_thumbnail)
    plain = np.stack([np.asarray(t) for t in tiles])
    if jpeg_rng is None:
        intern = plain
    else:
        intern = np.stack([np.asarray(jpeg_quality_augment(t, jpeg_rng, jpeg_quality_range)) for t in tiles])
    sam_tiles = plain if sam is None else np.stack([sam.host(t) for t in tiles])
    return {"tiles": intern, "sam_tiles": sam_tiles}
