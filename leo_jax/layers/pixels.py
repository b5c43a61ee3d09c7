"""Device-side pixel work shared by the models and the host preprocessors: Pillow-exact enlargement of uint8 images,
the rescale + mean/std normalisation as one multiply-add, and zero padding to a square (SAM's input rule).

Everything here is jit-friendly and works on channels-last uint8 / float arrays [..., H, W, C]. Resample filters are
named 'bilinear' or 'bicubic' (Pillow's integer codes 2 and 3 are accepted too).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # JAX is imported where the device work runs: the host halves serve JAX-free code too (PyTorch)
    import jax

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

_PIL_PRECISION_BITS = 22  # Pillow's Resample.c: 32 - 8 - 2 fractional bits for 8-bit resampling
_PIL_CODES = {"bilinear": 2, "bicubic": 3}  # Pillow's Image.Resampling values


def _bilinear_kernel(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic_kernel(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


_PIL_KERNELS = {2: (_bilinear_kernel, 1.0), 3: (_bicubic_kernel, 2.0)}


def _filter_code(resample: str | int) -> int:
    code = _PIL_CODES.get(resample) if isinstance(resample, str) else int(resample)
    if code not in _PIL_KERNELS:
        raise ValueError(f"device resampling supports 'bilinear' and 'bicubic', got {resample!r}")
    return code


@functools.lru_cache(maxsize=256)
def pil_resample_taps(in_size: int, out_size: int, resample: str | int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and fixed-point weights [out_size, taps] (int32) of Pillow's 8-bit resampling on one axis.

    Mirrors ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` in Pillow's Resample.c (double-precision filter
    weights normalised per output pixel, then rounded to 22 fractional bits), so that
    ``clip((sum(pixel * weight) + 2**21) >> 22, 0, 255)`` reproduces ``Image.resize`` bit for bit.
    """
    kernel, kernel_support = _PIL_KERNELS[_filter_code(resample)]
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = kernel_support * filter_scale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    offsets = np.arange(taps)
    used = offsets[None, :] < (xmax - xmin)[:, None]
    source = xmin[:, None] + offsets[None, :]
    weights = np.where(used, kernel((source - center[:, None] + 0.5) / filter_scale), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.where(total != 0, weights / np.where(total == 0, 1.0, total), weights)
    scaled = weights * (1 << _PIL_PRECISION_BITS)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    return np.where(used, source, xmin[:, None]).astype(np.int32), fixed


def resize_like_pil(pixels: jax.Array, size: tuple[int, int], resample: str | int = "bilinear") -> jax.Array:
    """Enlarge uint8 [..., H, W, C] to ``size`` = (h, w) on device, bit-identical to PIL ``Image.resize``.

    Separable, width pass first with a uint8 intermediate, in int32 fixed point like Pillow; jit-friendly (the taps
    are static constants). Lets LEO ship 448 px tiles and build SAM's 1024 px input on the accelerator.
    Only enlarging (or keeping) each axis is supported: when an axis shrinks, Pillow 13 chooses the pass order
    with its own heuristic, which we do not reproduce.
    """
    import jax.numpy as jnp

    code = _filter_code(resample)
    if pixels.dtype != jnp.uint8:
        raise TypeError(f"resize_like_pil expects uint8 pixels, got {pixels.dtype}")
    height, width = size
    in_height, in_width = pixels.shape[-3], pixels.shape[-2]
    if height < in_height or width < in_width:
        raise ValueError(f"resize_like_pil only enlarges: {in_height}x{in_width} -> {height}x{width}; "
                         "shrink on the host with PIL instead")

    def one_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
        if x.shape[axis] == out_size:
            return x
        index, weight = pil_resample_taps(x.shape[axis], out_size, code)
        shape = [1] * x.ndim
        shape[axis] = out_size
        acc = jnp.full(x.shape[:axis] + (out_size,) + x.shape[axis + 1:], 1 << (_PIL_PRECISION_BITS - 1), jnp.int32)
        for tap in range(index.shape[1]):
            acc = acc + jnp.take(x, index[:, tap], axis=axis).astype(jnp.int32) * weight[:, tap].reshape(shape)
        return jnp.clip(acc >> _PIL_PRECISION_BITS, 0, 255).astype(jnp.uint8)

    return one_axis(one_axis(pixels, pixels.ndim - 2, width), pixels.ndim - 3, height)


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """(h, w) with the longer side scaled to ``longest_edge`` (rounded half up, as transformers' SAM processor)."""
    scale = longest_edge / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def check_mean_std(mean: Sequence[float], std: Sequence[float], where: str) -> None:
    """Clear errors for a normalisation that cannot be applied to RGB pixels."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{where}: mean and std need 3 values (RGB), got mean={tuple(mean)}, std={tuple(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"{where}: std values must be positive, got {tuple(std)}")


def normalize_factors(mean: Sequence[float], std: Sequence[float], rescale_factor: float = 1 / 255
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) float32 [3] with (x * rescale_factor - mean) / std == x * scale + offset."""
    return (np.asarray([rescale_factor / s for s in std], np.float32),
            np.asarray([-m / s for m, s in zip(mean, std)], np.float32))


def normalize(pixels: jax.Array, mean: Sequence[float], std: Sequence[float], rescale_factor: float = 1 / 255,
              dtype: Any = "float32") -> jax.Array:
    """(pixels * rescale_factor - mean) / std on RGB pixels [..., H, W, 3], folded into one float32 multiply-add
    (differs from the two-step host arithmetic only by float32 rounding, < 1e-6)."""
    if pixels.shape[-1] != 3:
        raise ValueError(f"expected channels-last RGB pixels [..., H, W, 3], got shape {pixels.shape}")
    import jax.numpy as jnp

    scale, offset = normalize_factors(mean, std, rescale_factor)
    return (pixels.astype(jnp.float32) * scale + offset).astype(dtype)


def zero_outside(x: jax.Array, valid_hw: jax.Array) -> jax.Array:
    """``x`` [..., H, W, C] with everything outside each image's top-left ``valid_hw`` [..., 2] (h, w) set to 0."""
    import jax.numpy as jnp

    valid_hw = jnp.asarray(valid_hw)
    rows = jnp.arange(x.shape[-3])[:, None]
    cols = jnp.arange(x.shape[-2])[None, :]
    inside = (rows < valid_hw[..., 0, None, None]) & (cols < valid_hw[..., 1, None, None])
    return jnp.where(inside[..., None], x, jnp.zeros((), x.dtype))


def longest_edge_padded(pixels: jax.Array, longest_edge: int, pad_size: int, mean: Sequence[float],
                        std: Sequence[float], resample: str | int = "bilinear", rescale_factor: float = 1 / 255,
                        dtype: Any = "float32") -> jax.Array:
    """SAM's input rule on device for uint8 images no larger than ``longest_edge`` (LEO: its 448 px tiles): the
    longer side enlarged Pillow-exactly to ``longest_edge``, normalised, zero-padded bottom/right to
    ``pad_size`` x ``pad_size`` (padding is 0 in the normalised input, as the padding follows normalisation)."""
    import jax.numpy as jnp

    height, width = longest_edge_size(pixels.shape[-3], pixels.shape[-2], longest_edge)
    x = resize_like_pil(pixels, (height, width), resample)
    if (height, width) == (pad_size, pad_size):
        return normalize(x, mean, std, rescale_factor, dtype)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(0, pad_size - height), (0, pad_size - width), (0, 0)])
    return zero_outside(normalize(x, mean, std, rescale_factor), jnp.asarray([height, width])).astype(dtype)
