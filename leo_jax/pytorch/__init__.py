"""PyTorch models that load leo_jax exports (torch + transformers' standard modules, no JAX): LEO in the official
layout (`LeoModel`), LEO-MINI (`LeoMiniForCausalLM`), EVA-02 in timm's layout, and the CoTR / projector / MMoE
references the JAX modules are checked against. Torch Linear weights are the JAX kernels transposed."""

from leo_jax.pytorch.cotr import (
           CoTR,
           CoTRExpert,
           LeoProjector,
           MiniProjector,
           pixel_shuffle_internvl,
           pixel_unshuffle_tokens,
)
from leo_jax.pytorch.eva02 import Eva
from leo_jax.pytorch.leo import InternLM2ForCausalLM, InternVisionModel, LeoModel
from leo_jax.pytorch.leo_mini import LeoMiniForCausalLM

__all__ = ["CoTR", "CoTRExpert", "LeoProjector", "MiniProjector", "pixel_shuffle_internvl", "pixel_unshuffle_tokens",
           "InternLM2ForCausalLM", "InternVisionModel", "LeoModel", "Eva", "LeoMiniForCausalLM"]
