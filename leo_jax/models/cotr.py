"""CoTR (conditional token reduction, LEO-MINI): each vision expert's N_i tokens -> N^V tokens, steered by the prompt.

For expert i, with Ī_i = I_i W^I_i, Q̄_i = Q_i W^Q_i, T̂ = T W^T (all bias-free, width d_p):

    S_i = Q̄_i Ī_iᵀ + pool(Ī_i) Ī_iᵀ + Σ_{j≠i} pool(Ī_j) Ī_iᵀ + pool(T̂) Ī_iᵀ        [N^V, N_i]
    A_i = softmax over the N_i (valid) tokens of S_i * scale_i
    output = concat_i(A_i I_i) along channels                                       [N^V, Σ d_i]

The three pooled rows are broadcast over the N^V query rows. Because (a + b) Ī_iᵀ = a Ī_iᵀ + b Ī_iᵀ, the code adds
the pooled rows of every expert and of the text to the projected queries once and does one score matmul per
expert. T holds the prompt embeddings only: the caller's `text_mask` must exclude answer (and padding) tokens.
Two fixed reductions share the interface, for ablations (config `mode`): 'avg_pool' averages each expert's square
token grid onto the square N^V grid (no learned weights), 'keep_all' passes every expert token through (no
reduction; the experts must have equal token counts).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from leo_jax.config import dataclass_from_config, require
from leo_jax.layers.attention import MASK_VALUE
from leo_jax.layers.common import QUERY, Linear, check_numerics, normal_init, param, to_dtype
from leo_jax.sharding import constrain

POOLINGS = ("sum", "mean")
SCALES = ("sqrt_expert_width", "sqrt_proj_width", "none")
MODES = ("cotr", "avg_pool", "keep_all")


@dataclasses.dataclass(frozen=True)
class CoTROptions:
    """The configurable part of CoTR (LEO-MINI's `cotr` section); the model derives the expert widths and token counts
    and the text width (CoTRConfig). Points the published equations leave open, each a field whose default is the public
    reimplementation's reading of the paper:
    - pooling: how the three bias rows pool tokens: 'sum' (default, "sum_tokens" in the equations) or 'mean'
      (over the valid tokens; makes the bias independent of token counts and prompt length).
    - scale: 'sqrt_expert_width' (default) divides scores by sqrt(d_i) as written; 'sqrt_proj_width' by sqrt(d_p)
      (the usual attention scaling, since scores are d_p-dimensional dot products); 'none' leaves them as is.
    - visual_bias: whether the pooled visual rows pool(Ī_i) + Σ_{j≠i} pool(Ī_j) join the scores (default True, as
      written). They are the same for every query row, and when they outweigh the query term all N^V queries attend
      to the same token(s): measured on tiny LEO-MINI trained from random encoders, the query rows' attention
      weights had mean pairwise cosine 0.97 (every query on one or two of 64 tokens) with them and 0.41 without.
    - text_bias: whether the prompt row pool(T̂) (the conditioning) joins the scores (default True, the paper);
      False leaves the query (and visual) terms: reduction unconditioned on the text, for ablations.
    - spatial_prior (not in the paper; 0 = off, the default): > 0 adds the fixed score offset
      -|c_q - c_n|^2 / (2 spatial_prior^2), c_q the centre of query q's cell on a square N^V grid over the image and c_n
      that of token n on the expert's square token grid (spatial_prior is a fraction of the image side). Every query
      then starts as a soft pooling of its own region, so the output tokens keep the image's layout; content and
      prompt still move the weights. Experts trained from scratch need it (tiny presets); pretrained ones do not.
    - mode (not in the paper; default 'cotr'): 'avg_pool' replaces the attention by fixed average pooling of each
      expert's square token grid onto the square N^V grid (grid sides must divide), 'keep_all' by no reduction at all
      (every expert token reaches the projector: LEO-style token counts; all experts need the same N_i). Both have
      no learned CoTR weights; the query/projection fields are then unused.
    - expert token grids: not fixed here; they come from each expert's config via expert_tokens.
    Queries are initialised N(0, initializer_range^2) (not stated in the paper).
    """

    num_queries: int = 64
    proj_width: int = 256
    pooling: str = "sum"
    scale: str = "sqrt_expert_width"
    initializer_range: float = 0.02
    visual_bias: bool = True
    text_bias: bool = True
    spatial_prior: float = 0.0
    mode: str = "cotr"
    dtype: str = "bfloat16"
    param_dtype: str = "float32"

    def __post_init__(self):
        w = "config.cotr"
        for name in ("num_queries", "proj_width"):
            require(getattr(self, name) > 0, f"{w}.{name} must be positive, got {getattr(self, name)}")
        require(self.pooling in POOLINGS, f"{w}.pooling={self.pooling!r}: use one of {POOLINGS}")
        require(self.scale in SCALES, f"{w}.scale={self.scale!r}: use one of {SCALES}")
        require(self.mode in MODES, f"{w}.mode={self.mode!r}: use one of {MODES}")
        require(self.spatial_prior >= 0, f"{w}.spatial_prior must be >= 0 (0 = off), got {self.spatial_prior}")
        check_numerics(self, w)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.cotr") -> CoTROptions:
        """Also builds the subclass (derived widths given)."""
        return dataclass_from_config(cls, config, where)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CoTRConfig(CoTROptions):
    """CoTR over a list of vision experts: expert i gives `expert_tokens[i]` tokens of width `expert_widths[i]`.

    expert_tokens are the (maximum) token counts N_i; inputs must have exactly that many tokens, shorter expert
    outputs are padded and masked."""

    expert_widths: tuple[int, ...]
    expert_tokens: tuple[int, ...]
    text_width: int

    def __post_init__(self):
        w = "config.cotr"
        require(len(self.expert_widths) > 0, f"{w}.expert_widths is empty: CoTR needs at least one vision expert")
        require(len(self.expert_widths) == len(self.expert_tokens),
                f"{w}: expert_widths has {len(self.expert_widths)} entries but expert_tokens has "
                f"{len(self.expert_tokens)}; give one width and one token count per expert")
        for name in ("expert_widths", "expert_tokens"):
            require(all(v > 0 for v in getattr(self, name)), f"{w}.{name} must be positive, got {getattr(self, name)}")
        require(self.text_width > 0, f"{w}.text_width must be positive, got {self.text_width}")
        super().__post_init__()
        if self.mode == "avg_pool":
            side = math.isqrt(self.num_queries)
            for i, n in enumerate(self.expert_tokens):
                grid = math.isqrt(n)
                require(side * side == self.num_queries and grid * grid == n and grid % side == 0,
                        f"{w}.mode='avg_pool' pools each expert's square token grid onto the square num_queries grid, "
                        f"but expert_tokens[{i}]={n} and num_queries={self.num_queries} are not squares whose sides "
                        f"divide; set {w}.num_queries (or the expert's grid) accordingly")
        if self.mode == "keep_all":
            require(len(set(self.expert_tokens)) == 1,
                    f"{w}.mode='keep_all' concatenates the experts' tokens along channels, so every expert needs the "
                    f"same token count, got expert_tokens={self.expert_tokens}; set the experts' grids to match")
        if self.spatial_prior > 0:
            for name, count in [("num_queries", self.num_queries)] + [
                    (f"expert_tokens[{i}]", n) for i, n in enumerate(self.expert_tokens)]:
                require(math.isqrt(count) ** 2 == count,
                        f"{w}.{name}={count} is not a square grid; spatial_prior needs square query and token grids "
                        f"(or set {w}.spatial_prior=0)")

    @classmethod
    def from_options(cls, options: CoTROptions, expert_widths: tuple[int, ...], expert_tokens: tuple[int, ...],
                     text_width: int) -> CoTRConfig:
        fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(CoTROptions)}
        return cls(**fields, expert_widths=tuple(expert_widths), expert_tokens=tuple(expert_tokens),
                   text_width=text_width)

    @property
    def learned(self) -> bool:
        """Whether the reduction has learned weights (queries, projections): only mode 'cotr'."""
        return self.mode == "cotr"

    @property
    def output_tokens(self) -> int:
        """Tokens per image after the reduction: N^V, or every expert token for 'keep_all'."""
        return self.expert_tokens[0] if self.mode == "keep_all" else self.num_queries

    @property
    def output_width(self) -> int:
        """Σ d_i: channels of the concatenated output (the projector's input width)."""
        return sum(self.expert_widths)

    def score_scale(self, expert: int) -> float:
        if self.scale == "sqrt_expert_width":
            return self.expert_widths[expert] ** -0.5
        if self.scale == "sqrt_proj_width":
            return self.proj_width ** -0.5
        return 1.0

    def forward_flops(self, text_len: int) -> float:
        """Matmul FLOPs per sample with `text_len` prompt tokens (projections, scores, weighted sums; for 'avg_pool'
        the pooling as a weighted sum, for 'keep_all' none)."""
        dp, nv = self.proj_width, self.num_queries
        if self.mode == "keep_all":
            return 0.0
        if self.mode == "avg_pool":
            return 2.0 * sum(nv * n * d for d, n in zip(self.expert_widths, self.expert_tokens))
        flops = text_len * self.text_width * dp if self.text_bias else 0
        for d, n in zip(self.expert_widths, self.expert_tokens):
            flops += n * d * dp + nv * d * dp + nv * n * dp + nv * n * d
        return 2.0 * flops


def grid_centres(count: int) -> jnp.ndarray:
    """[count, 2] (row, col) centres in [0, 1] of a square grid of `count` cells in row-major order."""
    side = math.isqrt(count)
    coords = (jnp.arange(side, dtype=jnp.float32) + 0.5) / side
    return jnp.stack(jnp.meshgrid(coords, coords, indexing="ij"), axis=-1).reshape(count, 2)


def spatial_prior(num_queries: int, num_tokens: int, width: float) -> jnp.ndarray:
    """[N^V, N_i] score offsets -|c_q - c_n|^2 / (2 width^2): query q prefers the tokens near the q-th cell of a
    square grid laid over the image (width: a fraction of the image side)."""
    diff = grid_centres(num_queries)[:, None, :] - grid_centres(num_tokens)[None, :, :]
    return -jnp.sum(diff * diff, axis=-1) / (2 * width * width)


def avg_pool_weights(num_queries: int, num_tokens: int) -> jnp.ndarray:
    """[N^V, N_i] 0/1 membership of token n (square grid, row-major) in query q's cell of the coarser square grid."""
    side, grid = math.isqrt(num_queries), math.isqrt(num_tokens)
    cell = jnp.arange(grid) // (grid // side)  # coarse row (or column) of each fine row (column)
    rows = (cell[:, None] == jnp.arange(side)[None, :]).astype(jnp.float32)  # [grid, side]
    return jnp.einsum("ia,jb->abij", rows, rows).reshape(num_queries, num_tokens)


def masked_pool(x: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
    """[B, N, D] -> [B, D]: sum or mean over the tokens where mask [B, N] is True (0 when none is)."""
    total = jnp.sum(jnp.where(mask[..., None], x, 0), axis=1)
    if pooling == "mean":
        total = total / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1).astype(total.dtype)
    return total


class CoTRExpert(nnx.Module):
    """One expert's learnable queries Q_i [N^V, d_i] and bias-free projections W^Q_i, W^I_i [d_i, d_p]."""

    def __init__(self, width: int, cfg: CoTRConfig, *, rngs: nnx.Rngs):
        kw = dict(in_axes=("embed",), out_axes=("mlp",), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  kernel_init=normal_init(cfg.initializer_range), rngs=rngs)
        self.query = param(rngs, normal_init(cfg.initializer_range), (cfg.num_queries, width), ("queries", "embed"),
                           cfg.param_dtype, role=QUERY)
        self.query_proj = Linear(width, cfg.proj_width, **kw)
        self.token_proj = Linear(width, cfg.proj_width, **kw)


class CoTR(nnx.Module):
    """Per-expert features [B, N_i, d_i] + prompt embeddings [B, T, d_text] -> [B, N^V, Σ d_i]."""

    def __init__(self, cfg: CoTRConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.experts = nnx.List([CoTRExpert(width, cfg, rngs=rngs) for width in cfg.expert_widths]
                                if cfg.learned else [])
        self.text_proj = Linear(cfg.text_width, cfg.proj_width, in_axes=("embed",), out_axes=("mlp",),
                                dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                kernel_init=normal_init(cfg.initializer_range), rngs=rngs) \
            if cfg.learned and cfg.text_bias else None

    def __call__(self, features: Sequence[jax.Array], text: jax.Array, *,
                 feature_masks: Sequence[jax.Array | None] | None = None,
                 text_mask: jax.Array | None = None) -> jax.Array:
        """features[i] [B, N_i, d_i] with feature_masks[i] [B, N_i] (True = real token; all False for a sample
        without image, whose output is then 0); text [B, T, d_text] with text_mask [B, T] (True = prompt token).
        Returns [B, cfg.output_tokens, Σ d_i]."""
        dtype = to_dtype(self.cfg.dtype)
        if self.cfg.mode == "keep_all":
            self._check_inputs(features, text, feature_masks, text_mask)
            masks = feature_masks or [None] * len(features)
            kept = [f.astype(dtype) if m is None else jnp.where(m[..., None], f.astype(dtype), 0)
                    for f, m in zip(features, masks)]
            return constrain(jnp.concatenate(kept, axis=-1), ("batch", "length", "act_embed"))
        weights, features = self._attend(features, text, feature_masks, text_mask)
        outputs = [jnp.einsum("bqn,bnd->bqd", w.astype(dtype), f) for w, f in zip(weights, features)]
        return constrain(jnp.concatenate(outputs, axis=-1), ("batch", "length", "act_embed"))

    def attention(self, features: Sequence[jax.Array], text: jax.Array, *,
                  feature_masks: Sequence[jax.Array | None] | None = None,
                  text_mask: jax.Array | None = None) -> list[jax.Array]:
        """The softmax weights A_i [B, N^V, N_i] (fp32) of every expert, for the same inputs as the call: the CoTR
        output is concat_i(A_i I_i), so row q of A_i is what output token q looks at (attention maps). Mode
        'avg_pool' gives its fixed pooling weights; 'keep_all' has no weights."""
        if self.cfg.mode == "keep_all":
            raise ValueError("config.cotr.mode='keep_all' passes every token through: there are no reduction weights "
                             "to show")
        return self._attend(features, text, feature_masks, text_mask)[0]

    def _attend(self, features, text, feature_masks, text_mask) -> tuple[list[jax.Array], list[jax.Array]]:
        """(A_i [B, N^V, N_i] fp32, the masked features I_i in the compute dtype) of every expert."""
        cfg = self.cfg
        dtype = to_dtype(cfg.dtype)
        self._check_inputs(features, text, feature_masks, text_mask)
        batch = text.shape[0]
        masks = [jnp.ones((batch, n), bool) if m is None else m.astype(bool)
                 for n, m in zip(cfg.expert_tokens, feature_masks or [None] * len(features))]
        text_mask = jnp.ones(text.shape[:2], bool) if text_mask is None else text_mask.astype(bool)
        features = [jnp.where(m[..., None], f.astype(dtype), 0) for f, m in zip(features, masks)]
        if cfg.mode == "avg_pool":  # the mean of each cell's valid tokens (all-zero weights for an empty slot)
            pooled = [avg_pool_weights(cfg.num_queries, n)[None] * m[:, None, :].astype(jnp.float32)
                      for n, m in zip(cfg.expert_tokens, masks)]
            return [w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1.0) for w in pooled], features

        tokens = [expert.token_proj(f) for expert, f in zip(self.experts, features)]  # Ī_i [B, N_i, d_p]
        bias = jnp.zeros((batch, cfg.proj_width), dtype)
        if cfg.text_bias:
            bias = bias + masked_pool(self.text_proj(text), text_mask, cfg.pooling)  # pool(T̂) [B, d_p]
        if cfg.visual_bias:
            for t, m in zip(tokens, masks):
                bias = bias + masked_pool(t, m, cfg.pooling)  # + pool(Ī_i) + Σ_{j≠i} pool(Ī_j)

        weights = []
        for i, (expert, t, m) in enumerate(zip(self.experts, tokens, masks)):
            rows = expert.query_proj(expert.query[...])[None] + bias[:, None, :]  # [B, N^V, d_p]
            scores = jnp.einsum("bqp,bnp->bqn", rows, t, preferred_element_type=jnp.float32) * cfg.score_scale(i)
            if cfg.spatial_prior > 0:
                scores = scores + spatial_prior(cfg.num_queries, cfg.expert_tokens[i], cfg.spatial_prior)
            scores = jnp.where(m[:, None, :], scores, MASK_VALUE)
            # Padding gets weight exactly 0 (exp underflows). A sample without image has uniform weights over its
            # padding, whose features were zeroed above, so its output is 0 (and its gradients finite).
            weights.append(jax.nn.softmax(scores, axis=-1))
        return weights, features

    def _check_inputs(self, features, text, feature_masks, text_mask) -> None:
        cfg = self.cfg
        if len(features) != len(cfg.expert_widths):
            raise ValueError(f"CoTR got features from {len(features)} experts but config.cotr lists "
                             f"{len(cfg.expert_widths)} (expert_widths={cfg.expert_widths})")
        if feature_masks is not None and len(feature_masks) != len(features):
            raise ValueError(f"CoTR got {len(feature_masks)} feature masks for {len(features)} experts")
        if text.ndim != 3 or text.shape[-1] != cfg.text_width:
            raise ValueError(f"CoTR text embeddings must be [B, T, {cfg.text_width}] (config.cotr.text_width), "
                             f"got {text.shape}")
        if text_mask is not None and text_mask.shape != text.shape[:2]:
            raise ValueError(f"CoTR text_mask must be {text.shape[:2]}, got {text_mask.shape}")
        batch = text.shape[0]
        for i, (f, d, n) in enumerate(zip(features, cfg.expert_widths, cfg.expert_tokens)):
            if f.shape != (batch, n, d):
                raise ValueError(f"CoTR expert {i}: features must be [B={batch}, N_i={n}, d_i={d}] "
                                 f"(config.cotr.expert_tokens / expert_widths), got {f.shape}")
            if feature_masks is not None and feature_masks[i] is not None and feature_masks[i].shape != (batch, n):
                raise ValueError(f"CoTR expert {i}: feature mask must be {(batch, n)}, got {feature_masks[i].shape}")
