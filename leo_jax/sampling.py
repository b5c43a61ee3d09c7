"""The sampling options of text generation, shared by the JAX decoder (`leo_jax.infer.generate`) and the PyTorch
models' `generate()` (`leo_jax.pytorch.generation`).

Imports nothing but the standard library, so `leo_jax.pytorch` (which never imports JAX) uses it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """max_new_tokens >= 1; temperature 0 = greedy; top_p in (0, 1] keeps the smallest set of tokens whose
    probability reaches top_p; eos_ids: the stop ids, after which a row emits pad_id."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def from_hf(cls, max_new_tokens: int, temperature: float, top_p: float,
                eos_token_id: int | Sequence[int] | None, pad_token_id: int | None) -> SamplingConfig:
        """From Hugging Face-style `generate()` keyword arguments (one stop id or several; no pad id: 0)."""
        eos = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else eos_token_id
        return cls(max_new_tokens, temperature, top_p, tuple(int(i) for i in eos),
                   0 if pad_token_id is None else int(pad_token_id))
