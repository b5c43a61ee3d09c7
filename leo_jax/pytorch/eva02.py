"""A compact PyTorch EVA-02 written from the published architecture (timm `timm/models/eva.py`: `Eva`, `EvaBlock`,
`EvaAttention`, `SwiGLU`, `RotaryEmbeddingCat` with `in_pixels=False`): the EVA-02 expert of the PyTorch LEO-MINI
(leo_jax.pytorch.leo_mini) and the reference for leo_jax.models.vision.eva02, since timm itself cannot be installed
here (it needs torchvision).

Parameter names and shapes are timm's, so `state_dict()` is a timm-layout checkpoint of the vision tower:
cls_token [1, 1, D], pos_embed [1, 1 + N, D], patch_embed.proj, blocks.{i}.{norm1, attn.{q_proj, k_proj,
v_proj | qkv, q_bias, v_bias}, attn.norm, attn.proj, norm2, mlp.{fc1_g, fc1_x, norm, fc2 | fc1, fc2}}, norm.
`forward_features` is timm's. tests/golden/make_eva02_golden.py checks the same numbers against real timm where it
exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def freq_bands(num_bands: int, temperature: float = 10000.0, step: int = 1) -> torch.Tensor:
    exp = torch.arange(0, num_bands, step, dtype=torch.int64).to(torch.float32) / num_bands
    return 1.0 / (temperature ** exp)


def build_rotary_pos_embed(feat_shape, dim: int, temperature: float, ref_feat_shape=None):
    """timm build_rotary_pos_embed(in_pixels=False): sin, cos [prod(feat_shape), dim], bands repeat-interleaved."""
    bands = freq_bands(dim // 4, temperature=temperature, step=1)
    t = [torch.arange(s, dtype=torch.int64).to(torch.float32) for s in feat_shape]
    if ref_feat_shape is not None:
        t = [x / f * r for x, f, r in zip(t, feat_shape, ref_feat_shape)]
    grid = torch.stack(torch.meshgrid(t, indexing="ij"), dim=-1).unsqueeze(-1)
    pos = grid * bands
    n = 1
    for s in feat_shape:
        n *= s
    sin_emb = pos.sin().reshape(n, -1).repeat_interleave(2, -1)
    cos_emb = pos.cos().reshape(n, -1).repeat_interleave(2, -1)
    return sin_emb, cos_emb


def rot(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def apply_rot_embed_cat(x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    sin_emb, cos_emb = emb.tensor_split(2, -1)
    return x * cos_emb + rot(x) * sin_emb


class EvaAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_fused: bool, scale_norm: bool, num_prefix_tokens: int = 1):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_prefix_tokens = num_prefix_tokens
        if qkv_fused:
            self.qkv = nn.Linear(dim, dim * 3, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            self.qkv = None
            self.q_proj = nn.Linear(dim, dim, bias=True)
            self.k_proj = nn.Linear(dim, dim, bias=False)
            self.v_proj = nn.Linear(dim, dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        b, n, c = x.shape
        if self.qkv is not None:
            qkv = F.linear(x, weight=self.qkv.weight, bias=torch.cat((self.q_bias, self.k_bias, self.v_bias)))
            q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        if rope is not None:
            npt = self.num_prefix_tokens
            q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope)], dim=2).type_as(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj(self.norm(x))


class SwiGLU(nn.Module):
    """timm SwiGLU(norm_layer=LayerNorm): separate gate / value projections, a norm on the hidden activations."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1_g = nn.Linear(in_features, hidden_features)
        self.fc1_x = nn.Linear(in_features, hidden_features)
        self.act = nn.SiLU()
        self.norm = nn.LayerNorm(hidden_features, eps=1e-6)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1_g(x)) * self.fc1_x(x)))


class GluMlp(nn.Module):
    """timm GluMlp(act_layer=SiLU, gate_last=False): one packed fc1, the first half gates the second."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 2 * hidden_features)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.act(gate) * value)


class EvaBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_fused, scale_mlp, scale_attn_inner):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EvaAttention(dim, num_heads, qkv_fused, scale_attn_inner)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLU(dim, hidden) if scale_mlp else GluMlp(dim, hidden)

    def forward(self, x, rope=None):
        x = x + self.attn(self.norm1(x), rope=rope)
        return x + self.mlp(self.norm2(x))


class Eva(nn.Module):
    """timm Eva(class_token=True, use_abs_pos_emb=True, use_rot_pos_emb=True, swiglu_mlp=True, num_classes=0)."""

    def __init__(self, img_size=(224, 224), patch_size=14, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 mlp_ratio=4 * 2 / 3, qkv_fused=False, scale_mlp=True, scale_attn_inner=True, ref_feat_shape=(16, 16),
                 global_pool="token"):
        super().__init__()
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, embed_dim))
        sin_emb, cos_emb = build_rotary_pos_embed(self.grid, embed_dim // num_heads, 10000.0, ref_feat_shape)
        # buffers (not in the state dict, as timm's) so that .to(device) moves them with the weights
        self.register_buffer("rope", torch.cat([sin_emb, cos_emb], -1), persistent=False)
        self.blocks = nn.ModuleList([EvaBlock(embed_dim, num_heads, mlp_ratio, qkv_fused, scale_mlp, scale_attn_inner)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool == "token" else nn.Identity()

    def forward_features(self, x, return_hidden_states: bool = False):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        hidden = [x]
        for blk in self.blocks:
            x = blk(x, rope=self.rope)
            hidden.append(x)
        x = self.norm(x)
        return (x, hidden) if return_hidden_states else x
