"""Vision-to-LLM projectors: pixel (un)shuffle in the two channel orderings in use, and the MLP projectors.

- LEO, InternViT branch: InternVL's `pixel_shuffle(x, 0.5)` ("v2") on the 32x32 token grid -> 16x16 x 4C.
- LEO, SAM branch: `torch.nn.functional.pixel_unshuffle(x, 4)` on the NCHW neck output -> 16x16 x 16C.
- Projectors: LEO's LayerNorm -> Linear -> GELU -> Linear (InternVL `mlp1`), LEO-MINI's Linear -> GELU -> Linear.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from leo_jax.config import dataclass_from_config, require
from leo_jax.layers.common import LayerNorm, check_numerics
from leo_jax.layers.mlp import ACTIVATIONS, MLP


def _space_to_depth(x: jax.Array, factor: int, channels_last: bool) -> jax.Array:
    """[B, H, W, C] -> [B, H/r, W/r, C*r*r], each r x r block folded into channels.

    channels_last=True orders the channels (i, j, c) (row offset i, column offset j), False orders them (c, i, j).
    """
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"pixel unshuffle by {factor} needs a grid divisible by {factor}, got {h}x{w}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    order = (0, 1, 3, 2, 4, 5) if channels_last else (0, 1, 3, 5, 2, 4)
    return x.transpose(order).reshape(b, h // factor, w // factor, c * factor * factor)


def pixel_unshuffle_internvl(x: jax.Array, scale: float = 0.5) -> jax.Array:
    """InternVL's `pixel_shuffle(x, scale_factor=scale)` with ps_version 'v2' on a token grid [B, H, W, C].

    InternVL reshapes/permutes the grid so that, after swapping height and width back ('v2'), output
    [b, y, x] holds the input block rows y*r..y*r+r-1, columns x*r..x*r+r-1 with channel index
    (i * r + j) * C + c, r = 1/scale. Returns [B, H*scale, W*scale, C/scale^2].
    """
    factor = round(1 / scale)
    if factor < 1 or abs(factor * scale - 1) > 1e-9:
        raise ValueError(f"pixel_unshuffle_internvl: scale={scale} must be 1/r for an integer r (InternVL uses 0.5)")
    return _space_to_depth(x, factor, channels_last=True)


def pixel_unshuffle_torch(x: jax.Array, factor: int) -> jax.Array:
    """`torch.nn.functional.pixel_unshuffle(x_nchw, factor)` on an NHWC map [B, H, W, C], returning NHWC
    [B, H/r, W/r, C*r*r] with PyTorch's channel index c*r*r + i*r + j (as LEO applies to SAM's 256-channel map)."""
    if factor < 1:
        raise ValueError(f"pixel_unshuffle_torch: factor must be a positive integer, got {factor}")
    return _space_to_depth(x, factor, channels_last=False)


@dataclasses.dataclass(frozen=True)
class ProjectorOptions:
    """The configurable part of an MLP projector (a model's `projector` section); the model derives the widths.

    layer_norm=True is LEO's projector (LayerNorm(in) -> Linear(in, out) -> GELU -> Linear(out, out), InternVL's
    `mlp1`); layer_norm=False is LEO-MINI's (Linear -> GELU -> Linear, LLaVA's `mlp2x_gelu`).
    """

    layer_norm: bool = True
    norm_eps: float = 1e-5
    act: str = "gelu"
    dtype: str = "bfloat16"
    param_dtype: str = "float32"

    def __post_init__(self):
        w = "config.projector"
        require(self.act in ACTIVATIONS, f"{w}.act={self.act!r}: use one of {sorted(ACTIVATIONS)}")
        check_numerics(self, w)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.projector") -> ProjectorOptions:
        """Also builds the subclass (derived widths given)."""
        return dataclass_from_config(cls, config, where)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProjectorConfig(ProjectorOptions):
    """MLP projector from visual features (width `in_features`) to the LLM width (`out_features`)."""

    in_features: int
    out_features: int

    def __post_init__(self):
        require(self.in_features > 0 and self.out_features > 0, f"config.projector: in_features and out_features "
                f"must be positive, got {self.in_features}, {self.out_features}")
        super().__post_init__()

    @classmethod
    def from_options(cls, options: ProjectorOptions, in_features: int, out_features: int) -> ProjectorConfig:
        fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(ProjectorOptions)}
        return cls(**fields, in_features=in_features, out_features=out_features)

    def forward_flops(self, num_tokens: int) -> float:
        """Matmul FLOPs for `num_tokens` tokens."""
        return 2.0 * num_tokens * (self.in_features * self.out_features + self.out_features ** 2)


class MLPProjector(nnx.Module):
    """[..., in_features] -> [..., out_features]: optional LayerNorm, then fc2(GELU(fc1(x)))."""

    def __init__(self, cfg: ProjectorConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.norm = LayerNorm(cfg.in_features, eps=cfg.norm_eps, rngs=rngs, **kw) if cfg.layer_norm else None
        self.mlp = MLP(cfg.in_features, cfg.out_features, out_features=cfg.out_features, act=cfg.act, rngs=rngs,
                       **kw)  # kernels ~ N(0, 1/fan_in), biases 0 (the Linear defaults)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm is not None:
            x = self.norm(x)
        return self.mlp(x)


def torch_projector_names(layer_norm: bool) -> dict[str, str]:
    """leo_jax parameter path prefix -> the torch `nn.Sequential` index holding it (InternVL `mlp1`: 0 LayerNorm,
    1 Linear, 3 Linear; LLaVA `mlp2x_gelu`: 0 Linear, 2 Linear). Kernels are torch weights transposed;
    LayerNorm scale is torch `weight`."""
    if layer_norm:
        return {"norm": "0", "mlp.fc1": "1", "mlp.fc2": "3"}
    return {"mlp.fc1": "0", "mlp.fc2": "2"}
