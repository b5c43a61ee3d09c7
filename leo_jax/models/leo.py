"""LEO (arXiv 2501.06986, as in its official code): InternViT and SAM on every tile, each with its own projector,
tokens interleaved per tile (InternViT at even positions), tiles in crop order with the thumbnail last, written into
the LLM's embeddings at the <IMG_CONTEXT> positions.

Shapes are static: a fixed number K of tile slots per batch row with `tile_mask`, so one compiled step serves every
batch, text-only ones included. With a visual budget the batch also carries `visual_index` (the data pipeline's list
of the real tiles, a fixed count per step): the encoders then run on those tiles only, not on the empty slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from leo_jax.config import dataclass_from_config, require
from leo_jax.layers.pixels import longest_edge_padded, normalize
from leo_jax.models.llm.decoder import CausalLM, DecoderOutput, LLMConfig
from leo_jax.models.projector import (
    MLPProjector,
    ProjectorConfig,
    ProjectorOptions,
    pixel_unshuffle_internvl,
    pixel_unshuffle_torch,
)
from leo_jax.models.vision.intern_vit import InternViT, InternViTConfig
from leo_jax.models.vision.sam import SamVisionConfig, SamVisionEncoder
from leo_jax.models.visual_tokens import check_context_tokens, gather_slots, scatter_slots, scatter_visual_tokens
from leo_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class LeoConfig:
    visual_count = "tiles"  # the batch count (metrics.batch_counts) that forward_flops takes
    intern_vit: InternViTConfig
    sam: SamVisionConfig
    llm: LLMConfig
    projector: ProjectorOptions = ProjectorOptions()  # both projectors; their widths are derived
    intern_unshuffle: float = 0.5  # InternVL pixel shuffle ("v2") scale on the InternViT token grid
    sam_unshuffle: int = 4  # torch pixel_unshuffle factor on SAM's neck map
    image_context_id: int = -1  # the tokenizer's <IMG_CONTEXT> id (the trainer sets it from the tokenizer)

    export_family: ClassVar[str] = "leo"  # the conversion family that writes the whole model (leo_jax.convert)

    def __post_init__(self):
        n1 = (self.intern_vit.grid * self.intern_unshuffle) ** 2
        n2 = (self.sam.grid // self.sam_unshuffle) ** 2
        require(n1 == n2, f"config.model: InternViT gives {n1:g} tokens per tile after pixel shuffle but SAM gives "
                          f"{n2}; the interleaving needs equal counts (check image sizes, patch sizes, unshuffle)")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.model") -> LeoConfig:
        return dataclass_from_config(cls, config, where)

    def projector_config(self, in_features: int) -> ProjectorConfig:
        return ProjectorConfig.from_options(self.projector, in_features, self.llm.hidden_size)

    @property
    def intern_features(self) -> int:
        return int(self.intern_vit.hidden_size / self.intern_unshuffle ** 2)

    @property
    def sam_features(self) -> int:
        return self.sam.output_channels * self.sam_unshuffle ** 2

    def tokens_per_tile(self) -> int:
        return 2 * (self.sam.grid // self.sam_unshuffle) ** 2

    def visual_tokens_per_image(self) -> str:
        return f"{self.tokens_per_tile()} per tile, 1-7 tiles: {self.tokens_per_tile()}..{7 * self.tokens_per_tile()}"

    def visual_tokens(self, tiles: float) -> float:
        """Visual tokens the LLM reads for `tiles` tiles."""
        return tiles * self.tokens_per_tile()

    def tile_forward_flops(self) -> float:
        """Forward FLOPs of one tile: both encoders and both projectors."""
        per_encoder = self.tokens_per_tile() // 2
        return (self.intern_vit.forward_flops() + self.sam.forward_flops()
                + self.projector_config(self.intern_features).forward_flops(per_encoder)
                + self.projector_config(self.sam_features).forward_flops(per_encoder))

    def forward_flops(self, seq_len: int, tiles: float = 7) -> float:
        """Forward FLOPs per sample: the LLM at `seq_len` tokens (visual tokens included) plus `tiles` tiles (real
        tiles only; the default is a full 6 + thumbnail image)."""
        return self.llm.forward_flops(seq_len) + tiles * self.tile_forward_flops()


class Leo(nnx.Module):
    def __init__(self, cfg: LeoConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.intern_vit = InternViT(cfg.intern_vit, rngs=rngs)
        self.sam = SamVisionEncoder(cfg.sam, rngs=rngs)
        self.projector_intern = MLPProjector(cfg.projector_config(cfg.intern_features), rngs=rngs)
        self.projector_sam = MLPProjector(cfg.projector_config(cfg.sam_features), rngs=rngs)
        self.llm = CausalLM(cfg.llm, rngs=rngs)

    @property
    def language_model(self) -> CausalLM:
        return self.llm

    def tile_tokens(self, tiles: jax.Array, sam_tiles: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """uint8 tiles [N, t, t, 3] and SAM inputs [N, s, s, 3] -> interleaved tokens [N, 2 * n, d_llm].

        SAM inputs smaller than SAM's image size (e.g. the 448 px tiles themselves) are enlarged on device exactly
        like the host path (PIL bilinear), which moves ~5x fewer bytes than shipping 1024 px tiles."""
        cfg = self.cfg
        intern, sam = cfg.intern_vit, cfg.sam
        x = self.intern_vit(normalize(tiles, intern.pixel_mean, intern.pixel_std), rng=rng)[:, 1:]  # drop CLS
        g = int(round(x.shape[1] ** 0.5))
        x = pixel_unshuffle_internvl(x.reshape(x.shape[0], g, g, -1), cfg.intern_unshuffle)
        intern_tokens = self.projector_intern(x.reshape(x.shape[0], -1, x.shape[-1]))

        sam_in = normalize(sam_tiles, sam.pixel_mean, sam.pixel_std) if sam_tiles.shape[-2] == sam.image_size \
            else longest_edge_padded(sam_tiles, sam.image_size, sam.image_size, sam.pixel_mean, sam.pixel_std)
        y = pixel_unshuffle_torch(self.sam(sam_in), cfg.sam_unshuffle)
        sam_tokens = self.projector_sam(y.reshape(y.shape[0], -1, y.shape[-1]))
        # token-by-token alternation: out[0::2] = InternViT, out[1::2] = SAM
        return jnp.stack([intern_tokens, sam_tokens], axis=2).reshape(intern_tokens.shape[0], -1,
                                                                      intern_tokens.shape[-1])

    def embed_inputs(self, batch: Mapping[str, jax.Array], *, rng: jax.Array | None = None,
                     deterministic: bool = True) -> tuple[jax.Array, None]:
        ids = batch["input_ids"]
        tiles, sam_tiles, tile_mask = batch["tiles"], batch["sam_tiles"], batch["tile_mask"]
        b, k = tile_mask.shape
        rng = None if deterministic else rng
        if "visual_index" in batch:  # the budget's tiles only; empty slots get zeros (no context position reads them)
            index = batch["visual_index"]
            tokens = self.tile_tokens(constrain(gather_slots(tiles, index), ("batch", None, None, None)),
                                      constrain(gather_slots(sam_tiles, index), ("batch", None, None, None)), rng)
            tokens = scatter_slots(tokens, index, b, k).reshape(b * k, *tokens.shape[1:])
        else:
            tokens = self.tile_tokens(tiles.reshape(b * k, *tiles.shape[2:]),
                                      sam_tiles.reshape(b * k, *sam_tiles.shape[2:]), rng)
        per_tile = tokens.shape[1]
        visual = tokens.reshape(b, k * per_tile, tokens.shape[-1])
        context = ids == self.cfg.image_context_id
        check_context_tokens(context, jnp.repeat(tile_mask, per_tile, axis=1), "LEO")
        return scatter_visual_tokens(self.llm.embed(ids), context, visual), None

    def train_forward(self, batch: Mapping[str, jax.Array], *, rng: jax.Array | None = None,
                      deterministic: bool = True) -> DecoderOutput:
        embeds, _ = self.embed_inputs(batch, rng=rng, deterministic=deterministic)
        out = self.llm.forward(embeds, segment_ids=batch["segment_ids"], positions=batch["positions"])
        visual_mask = jnp.repeat(batch["tile_mask"], self.cfg.tokens_per_tile(), axis=1)
        mismatch = check_context_tokens(batch["input_ids"] == self.cfg.image_context_id, visual_mask, "LEO")
        return out._replace(aux={**out.aux, "visual_token_mismatch": mismatch})
