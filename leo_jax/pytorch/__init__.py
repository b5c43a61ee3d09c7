"""PyTorch reference modules (torch only, no JAX): the export target for leo_jax weights and the parity references
of the tests. Parameter names map 1:1 onto the leo_jax modules (torch Linear weights are the JAX kernels
transposed)."""

from leo_jax.pytorch.cotr import CoTR, CoTRExpert, LeoProjector, MiniProjector, pixel_shuffle_internvl, \
    pixel_unshuffle_tokens

__all__ = ["CoTR", "CoTRExpert", "LeoProjector", "MiniProjector", "pixel_shuffle_internvl", "pixel_unshuffle_tokens"]
