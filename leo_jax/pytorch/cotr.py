"""PyTorch reference of LEO / LEO-MINI's vision-to-LLM glue: pixel (un)shuffle, MLP projectors and CoTR.

Written straight from the CoTR equations written out in leo_jax/models/cotr.py (loops over experts, each score term
computed on its own, explicit masks), independently of leo_jax/models/cotr.py, so the two check each other. Depends
on torch only.
Parameter names match leo_jax: `experts.{i}.query`, `experts.{i}.query_proj.weight`, `experts.{i}.token_proj.weight`,
`text_proj.weight` (Linear weights = leo_jax kernels transposed); projectors keep InternVL's / LLaVA's
`nn.Sequential` indices (see leo_jax.models.projector.torch_projector_names).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def pixel_shuffle_internvl(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL's `InternVLChatModel.pixel_shuffle` with ps_version 'v2', as in its code: [N, W, H, C] token grid
    -> [N, W*s, H*s, C/s^2]."""
    n, w, h, c = x.size()
    # N, W, H, C --> N, W, H * scale, C // scale
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    # N, W, H * scale, C // scale --> N, H * scale, W, C // scale
    x = x.permute(0, 2, 1, 3).contiguous()
    # N, H * scale, W, C // scale --> N, H * scale, W * scale, C // (scale ** 2)
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()  # 'v2': swap height and width back


def pixel_unshuffle_tokens(x: torch.Tensor, factor: int) -> torch.Tensor:
    """LEO's SAM branch: NCHW map [B, C, H, W] -> pixel_unshuffle -> row-major tokens [B, H*W/r^2, C*r*r]."""
    return F.pixel_unshuffle(x, factor).flatten(2).transpose(1, 2)


class LeoProjector(nn.Sequential):
    """LEO / InternVL `mlp1`: LayerNorm(in) -> Linear(in, out) -> GELU -> Linear(out, out) (indices 0, 1, 3)."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5):
        super().__init__(nn.LayerNorm(in_features, eps=eps), nn.Linear(in_features, out_features), nn.GELU(),
                         nn.Linear(out_features, out_features))


class MiniProjector(nn.Sequential):
    """LEO-MINI / LLaVA `mlp2x_gelu`: Linear(in, out) -> GELU -> Linear(out, out) (indices 0, 2)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


class CoTRExpert(nn.Module):
    """Learnable queries Q_i [N^V, d_i]; bias-free W^Q_i (`query_proj`) and W^I_i (`token_proj`), d_i -> d_p."""

    def __init__(self, width: int, num_queries: int, proj_width: int, init_std: float = 0.02):
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, width) * init_std)
        self.query_proj = nn.Linear(width, proj_width, bias=False)
        self.token_proj = nn.Linear(width, proj_width, bias=False)


class CoTR(nn.Module):
    """Conditional token reduction over a list of experts; see leo_jax.models.cotr.CoTRConfig for the
    meaning of `pooling` ('sum' | 'mean'), `scale` ('sqrt_expert_width' | 'sqrt_proj_width' | 'none') and
    `visual_bias` (False drops the pooled visual rows, keeping the query and prompt terms), `text_bias` (False drops
    the pooled prompt row: no conditioning), `spatial_prior` (> 0: the Gaussian score offset that points query q at
    the q-th cell of a square grid over the image) and `mode` ('cotr'; 'avg_pool': average pooling of each expert's
    square token grid onto the square num_queries grid; 'keep_all': every token passes, concatenated along
    channels). The fixed modes have no parameters; without text_bias there is no `text_proj`."""

    def __init__(self, expert_widths: Sequence[int], text_width: int, num_queries: int = 64, proj_width: int = 256,
                 pooling: str = "sum", scale: str = "sqrt_expert_width", init_std: float = 0.02,
                 visual_bias: bool = True, spatial_prior: float = 0.0, text_bias: bool = True, mode: str = "cotr"):
        super().__init__()
        if mode not in ("cotr", "avg_pool", "keep_all"):
            raise ValueError(f"mode={mode!r}: use 'cotr', 'avg_pool' or 'keep_all'")
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling={pooling!r}: use 'sum' or 'mean'")
        if scale not in ("sqrt_expert_width", "sqrt_proj_width", "none"):
            raise ValueError(f"scale={scale!r}: use 'sqrt_expert_width', 'sqrt_proj_width' or 'none'")
        self.pooling, self.scale, self.proj_width, self.visual_bias = pooling, scale, proj_width, visual_bias
        self.spatial_prior, self.text_bias, self.mode, self.num_queries = spatial_prior, text_bias, mode, num_queries
        learned = mode == "cotr"
        self.experts = nn.ModuleList(CoTRExpert(d, num_queries, proj_width, init_std) for d in expert_widths
                                     if learned)
        self.text_proj = nn.Linear(text_width, proj_width, bias=False) if learned and text_bias else None

    @staticmethod
    def grid_offsets(num_queries: int, num_tokens: int, width: float) -> torch.Tensor:
        """[N^V, N_i]: -squared distance / (2 width^2) between query q's cell centre and token n's patch centre,
        both on square grids over the unit image (row-major)."""
        q_side, n_side = math.isqrt(num_queries), math.isqrt(num_tokens)
        offsets = torch.empty(num_queries, num_tokens)
        for q in range(num_queries):
            qy, qx = (q // q_side + 0.5) / q_side, (q % q_side + 0.5) / q_side
            for n in range(num_tokens):
                ny, nx = (n // n_side + 0.5) / n_side, (n % n_side + 0.5) / n_side
                offsets[q, n] = -((qy - ny) ** 2 + (qx - nx) ** 2) / (2 * width ** 2)
        return offsets

    def grid_average(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, N, d] on a square token grid -> [B, N^V, d]: mean of the valid tokens in each cell of the square
        num_queries grid (0 where none is), by avg_pool2d of the masked features divided by that of the mask."""
        b, n, d = features.shape
        grid, side = math.isqrt(n), math.isqrt(self.num_queries)
        m = mask.to(features.dtype).reshape(b, 1, grid, grid)
        x = (features * mask.unsqueeze(-1)).transpose(1, 2).reshape(b, d, grid, grid)
        total, count = F.avg_pool2d(x, grid // side), F.avg_pool2d(m, grid // side)
        mean = torch.where(count > 0, total / count.clamp(min=1e-12), torch.zeros_like(total))
        return mean.flatten(2).transpose(1, 2)

    def pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, D] over the tokens where mask [B, N] is True."""
        m = mask.to(x.dtype).unsqueeze(-1)
        total = (x * m).sum(dim=1)
        if self.pooling == "mean":
            total = total / m.sum(dim=1).clamp(min=1.0)
        return total

    def forward(self, features: Sequence[torch.Tensor], text: torch.Tensor,
                feature_masks: Sequence[torch.Tensor] | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """features[i] [B, N_i, d_i], text [B, T, d_text] (prompt embeddings) -> [B, N^V, Σ d_i]."""
        if feature_masks is None:
            feature_masks = [torch.ones(f.shape[:2], dtype=torch.bool) for f in features]
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool)
        if self.mode == "keep_all":
            return torch.cat([f.masked_fill(~m.unsqueeze(-1), 0.0) for f, m in zip(features, feature_masks)], dim=-1)
        if self.mode == "avg_pool":
            return torch.cat([self.grid_average(f, m) for f, m in zip(features, feature_masks)], dim=-1)
        projected = [e.token_proj(f) for e, f in zip(self.experts, features)]  # Ī_j [B, N_j, d_p]
        pooled = [self.pool(p, m) for p, m in zip(projected, feature_masks)]  # pool(Ī_j) [B, d_p]
        pooled_text = self.pool(self.text_proj(text), text_mask) if self.text_bias else None  # pool(T̂) [B, d_p]

        outputs = []
        for i, expert in enumerate(self.experts):
            image_i, tokens_i, mask_i = features[i], projected[i], feature_masks[i]
            queries = expert.query_proj(expert.query)  # Q̄_i [N^V, d_p]
            others = sum((pooled[j] for j in range(len(self.experts)) if j != i), torch.zeros_like(pooled[i]))
            scores = torch.einsum("qp,bnp->bqn", queries, tokens_i)  # Q̄_i Ī_iᵀ
            if self.visual_bias:
                scores = scores + torch.einsum("bp,bnp->bn", pooled[i], tokens_i).unsqueeze(1)  # pool(Ī_i) Ī_iᵀ
                scores = scores + torch.einsum("bp,bnp->bn", others, tokens_i).unsqueeze(1)  # Σ_{j≠i} pool(Ī_j) Ī_iᵀ
            if self.text_bias:
                scores = scores + torch.einsum("bp,bnp->bn", pooled_text, tokens_i).unsqueeze(1)  # pool(T̂) Ī_iᵀ
            if self.scale == "sqrt_expert_width":
                scores = scores / math.sqrt(image_i.shape[-1])
            elif self.scale == "sqrt_proj_width":
                scores = scores / math.sqrt(self.proj_width)
            if self.spatial_prior > 0:
                scores = scores + self.grid_offsets(queries.shape[0], image_i.shape[1], self.spatial_prior)
            valid = mask_i.unsqueeze(1)  # [B, 1, N_i]
            scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=-1) * valid  # a sample without image gets all-zero weights
            outputs.append(weights @ image_i.masked_fill(~mask_i.unsqueeze(-1), 0.0))
        return torch.cat(outputs, dim=-1)
