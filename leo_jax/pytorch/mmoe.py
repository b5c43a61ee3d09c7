"""PyTorch MMoE (LEO-MINI), written from the equations: the reference for leo_jax.models.mmoe and the building block
of the PyTorch LEO-MINI. Parameter names mirror the JAX ones (router.fc1, experts lora_a [E, in, r], ...)."""

from __future__ import annotations

import torch
from torch import nn


class Router(nn.Module):
    """2-layer GELU MLP over [h ; Linear(mean visual) ; Linear(mean prompt)] -> softmax over E."""

    def __init__(self, hidden: int, num_experts: int, cond_dim: int, router_hidden: int):
        super().__init__()
        self.visual_proj = nn.Linear(hidden, cond_dim)
        self.prompt_proj = nn.Linear(hidden, cond_dim)
        self.fc1 = nn.Linear(hidden + 2 * cond_dim, router_hidden)
        self.fc2 = nn.Linear(router_hidden, num_experts)

    def forward(self, h: torch.Tensor, visual: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        v = self.visual_proj(visual).expand(b, t, -1)
        p = self.prompt_proj(prompt).expand(b, t, -1)
        return torch.softmax(self.fc2(nn.functional.gelu(self.fc1(torch.cat([h, v, p], -1)))).float(), -1)


class LoRAExperts(nn.Module):
    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.zeros(num_experts, in_features, rank))
        self.lora_b = nn.Parameter(torch.zeros(num_experts, rank, out_features))

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        out = 0
        for e in range(self.lora_a.shape[0]):  # per expert, as written in the equation
            out = out + gates[..., e:e + 1] * self.scale * (x @ self.lora_a[e] @ self.lora_b[e])
        return out


class MMoELinear(nn.Module):
    """y = W0 x + B_g A_g x + sum_{e in top-k} g_e B_e A_e x, routed by `set_routing(h, visual, prompt)` before the
    forward (h: the layer's normalised input [B, T, d]; visual/prompt: mean visual token and prompt embedding,
    [B, 1, d] for every token or [B, T, d] per token)."""

    def __init__(self, base: nn.Linear, hidden: int, num_experts: int = 3, rank: int = 16, alpha: float = 16.0,
                 general_rank: int = 16, general_alpha: float = 16.0, top_k: int = 1, cond_dim: int = 256,
                 router_hidden: int = 256, gate_mode: str = "prob", renormalize: bool = False):
        super().__init__()
        self.base, self.top_k, self.gate_mode, self.renormalize = base, top_k, gate_mode, renormalize
        self.router = Router(hidden, num_experts, cond_dim, router_hidden)
        self.experts = LoRAExperts(base.in_features, base.out_features, num_experts, rank, alpha)
        self.general = LoRAExperts(base.in_features, base.out_features, 1, general_rank, general_alpha) \
            if general_rank else None
        self.gates = self.probs = None

    def set_routing(self, h: torch.Tensor, visual: torch.Tensor, prompt: torch.Tensor) -> None:
        probs = self.router(h, visual, prompt)
        top = torch.topk(probs, self.top_k, dim=-1).indices
        selected = torch.zeros_like(probs).scatter(-1, top, 1.0)
        if self.gate_mode == "straight_through":
            gates = selected + probs - probs.detach()
        else:
            gates = selected * probs
            if self.renormalize:
                gates = gates / gates.sum(-1, keepdim=True)
        self.gates, self.probs = gates, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gates is None:
            raise RuntimeError("MMoELinear.set_routing(h, visual, prompt) must run before the forward")
        y = self.base(x) + self.experts(x, self.gates).to(x.dtype)
        if self.general is not None:
            y = y + self.general(x, torch.ones_like(self.gates[..., :1])).to(x.dtype)
        return y


def balance_loss(probs: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Switch balance loss E * sum_e f_e P_e over the real tokens."""
    w = token_mask.float()[..., None]
    n = w.sum().clamp(min=1.0)
    load = (nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).float() * w).sum((0, 1)) / n
    return probs.shape[-1] * (load * (probs * w).sum((0, 1)) / n).sum()
