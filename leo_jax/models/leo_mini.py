"""LEO-MINI (arXiv 2504.04653): any list of vision experts -> CoTR (64 tokens per image, conditioned on the prompt) ->
projector -> an LLM whose layers carry MMoE LoRA experts routed by the text and the image.

Multi-turn conversations (`conditioning`, default 'turns_so_far'): the prompt text that conditions CoTR and the
routers is, for every token of exchange k (its user turn, its images, its answer), the user turns 1..k of its own
sample; an image is compressed with the user turns up to the one that holds it. Why: an answer must not be
conditioned on questions asked after it (at inference they do not exist yet), and it may use everything asked so
far, as its attention already does; with LLaVA data (images in the first turn) every image sees its own question.
Exchanges are read from the batch itself (a new exchange starts after each supervised answer), so training rows,
validation rows and the inference engine's prompts (history answers included) give every token the same
conditioning. Options: 'first_turn' (the first user turn only, for every token and image) and 'all_turns' (every
user turn of the sample, later ones included: identical on single-turn data, a leak on multi-turn data).

The expert list is configuration: each entry names an encoder kind (leo_jax.models.registry), its config, and the
options of its host image preprocessor (the data pipeline's; the model receives its uint8 output and normalises it
with the encoder config's pixel_mean / pixel_std). Token counts and widths are derived from the encoder configs by
abstract evaluation, never hard-coded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from leo_jax.config import FrozenDict, dataclass_from_config, freeze, require
from leo_jax.layers.pixels import normalize
from leo_jax.models.cotr import CoTR, CoTRConfig, CoTROptions
from leo_jax.models.llm.decoder import CausalLM, DecoderOutput, LLMConfig
from leo_jax.models.mmoe import RoutingContext
from leo_jax.models.projector import MLPProjector, ProjectorConfig, ProjectorOptions
from leo_jax.models.registry import model_classes
from leo_jax.models.visual_tokens import (
    check_context_tokens,
    gather_slots,
    per_token_context,
    scatter_slots,
    scatter_visual_tokens,
)
from leo_jax.sharding import constrain

# How each encoder kind's output becomes tokens: a leading CLS token to drop, or a NHWC feature map to resize.
ENCODER_OUTPUTS = {
    "clip_vision": dict(cls_token=True, feature_map=False),
    "eva02": dict(cls_token=True, feature_map=False),
    "intern_vit": dict(cls_token=True, feature_map=False),
    "siglip_vision": dict(cls_token=False, feature_map=False),
    "pix2struct_vision": dict(cls_token=False, feature_map=False),
    "convnext": dict(cls_token=False, feature_map=True),
    "sam_vision": dict(cls_token=False, feature_map=True),
}
PATCH_INPUT_KINDS = ("pix2struct_vision",)  # inputs are flattened patches, standardised on the host
NORMALISATION_OPTIONS = ("mean", "std", "rescale_factor")  # the encoder config's pixel_mean / pixel_std instead
CONDITIONING = ("turns_so_far", "first_turn", "all_turns")


@dataclasses.dataclass(frozen=True)
class VisionExpertConfig:
    """One vision expert: `kind` (encoder, see ENCODER_OUTPUTS), its `encoder` config (the config dataclass of that
    kind, built from the section by `from_config`), its host image `processor` ({'kind': ..., geometry options of the
    data pipeline's preprocessor}, whose output is the encoder's image_size); feature maps are resized to `grid` x
    `grid` tokens (bilinear), e.g. ConvNeXt's late stage to 24 x 24 = 576 tokens."""

    name: str
    kind: str
    encoder: Any
    processor: FrozenDict
    grid: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "processor", freeze(self.processor))
        w = f"config.model.experts.{self.name}"
        require(self.kind in ENCODER_OUTPUTS, f"{w}.kind={self.kind!r}: use one of {sorted(ENCODER_OUTPUTS)}")
        require("kind" in self.processor, f"{w}.processor needs a 'kind' (an image_processing preprocessor)")
        moved = sorted(set(self.processor) & set(NORMALISATION_OPTIONS))
        require(not moved, f"{w}.processor sets {moved}: the model normalises with the encoder config's "
                           f"pixel_mean / pixel_std; set {w}.encoder.pixel_mean / pixel_std instead")
        if ENCODER_OUTPUTS[self.kind]["feature_map"]:
            require(self.grid is None or self.grid > 0, f"{w}.grid must be positive")
        config_cls, _ = model_classes(self.kind)
        require(isinstance(self.encoder, config_cls), f"{w}.encoder must be a {config_cls.__name__} (the config of "
                                                      f"kind {self.kind!r}), got {type(self.encoder).__name__}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str) -> VisionExpertConfig:
        """The `encoder` section becomes the config dataclass of the expert's `kind`."""
        require(isinstance(config, Mapping), f"{where} must be a mapping, got {config!r}")
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        kind = config.get("kind")
        require(kind in ENCODER_OUTPUTS, f"{where}.kind={kind!r}: use one of {sorted(ENCODER_OUTPUTS)}")
        if isinstance(config.get("encoder"), Mapping):
            config["encoder"] = model_classes(kind)[0].from_config(config["encoder"], f"{where}.encoder")
        return dataclass_from_config(cls, config, where)

    @property
    def batch_key(self) -> str:
        return f"patches_{self.name}" if self.kind in PATCH_INPUT_KINDS else f"pixels_{self.name}"



@dataclasses.dataclass(frozen=True)
class LeoMiniConfig:
    """`experts` in model order (each with its `name`). Config files key them by name (so
    `--config.model.experts.clip.encoder.num_layers=4` works) and give the order in `expert_order`."""

    visual_count = "images"  # the batch count (metrics.batch_counts) that forward_flops takes
    experts: tuple[VisionExpertConfig, ...]
    llm: LLMConfig
    cotr: CoTROptions  # CoTR's options; the expert widths / token counts and the text width are derived
    projector: ProjectorOptions  # the projector's options; its widths are derived
    image_context_id: int = -1  # the tokenizer's <IMG_CONTEXT> id (the trainer sets it from the tokenizer)
    # Expert names in model order (the order of CoTR's experts and of the projector's input channels); with
    # experts keyed by name it lists every key once.
    expert_order: tuple[str, ...] = ()
    conditioning: str = "turns_so_far"  # which user turns condition CoTR and the routers (module docstring)

    export_family: ClassVar[str] = "leo_mini"  # the conversion family that writes the whole model (leo_jax.convert)

    def __post_init__(self):
        require(self.conditioning in CONDITIONING,
                f"config.model.conditioning={self.conditioning!r}: use one of {CONDITIONING}")
        require(len(self.experts) > 0, "config.model.experts is empty: LEO-MINI needs at least one vision expert")
        names = [e.name for e in self.experts]
        require(len(set(names)) == len(names), f"config.model.experts: duplicate expert names {names}")
        require(not self.expert_order or list(self.expert_order) == names,
                f"config.model.expert_order={self.expert_order} differs from the experts' order {names}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.model") -> LeoMiniConfig:
        """Experts either keyed by name (config files: order from `expert_order`) or a sequence in model order
        whose entries carry their `name`; a projector section without `layer_norm` gets LEO-MINI's (none)."""
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        experts = config.get("experts")
        if isinstance(experts, Mapping):
            experts = keyed_experts(experts, tuple(config.get("expert_order") or ()), where)
        if isinstance(experts, (list, tuple)):
            config["experts"] = tuple(
                e if isinstance(e, VisionExpertConfig) else VisionExpertConfig.from_config(
                    e, f"{where}.experts.{e.get('name', i) if isinstance(e, Mapping) else i}")
                for i, e in enumerate(experts))
        if isinstance(config.get("projector"), Mapping):
            config["projector"] = {"layer_norm": False, **config["projector"]}
        return dataclass_from_config(cls, config, where)

    @functools.cached_property
    def expert_shapes(self) -> tuple[tuple[int, int], ...]:
        """(tokens N_i, width d_i) of every expert, by abstract evaluation of its encoder on its input size."""
        shapes = []
        for spec in self.experts:
            graphdef, state = nnx.split(nnx.eval_shape(
                lambda s=spec: model_classes(s.kind)[1](s.encoder, rngs=nnx.Rngs(0))))
            run = lambda state, *inputs, s=spec: expert_tokens(s, nnx.merge(graphdef, state), *inputs)[0]  # noqa
            out = jax.eval_shape(run, state, *expert_dummy_inputs(spec))
            shapes.append((out.shape[1], out.shape[2]))
        return tuple(shapes)

    @functools.cached_property
    def cotr_config(self) -> CoTRConfig:
        shapes = self.expert_shapes
        return CoTRConfig.from_options(self.cotr, expert_widths=tuple(d for _, d in shapes),
                                       expert_tokens=tuple(n for n, _ in shapes), text_width=self.llm.hidden_size)

    @functools.cached_property
    def projector_config(self) -> ProjectorConfig:
        return ProjectorConfig.from_options(self.projector, sum(d for _, d in self.expert_shapes), self.llm.hidden_size)

    def visual_tokens_per_image(self) -> int:
        """CoTR's output tokens per image: num_queries, or every expert token when config.model.cotr.mode is
        'keep_all' (then from the experts' shapes)."""
        return self.cotr_config.output_tokens if self.cotr.mode == "keep_all" else self.cotr.num_queries

    def visual_tokens(self, images: float) -> float:
        """Visual tokens the LLM reads for `images` images."""
        return images * self.visual_tokens_per_image()

    def image_forward_flops(self, text_len: int) -> float:
        """Forward FLOPs of one image: every vision expert at its configured image size, CoTR conditioned on
        `text_len` tokens, and the projector."""
        flops = self.cotr_config.forward_flops(text_len) + self.projector_config.forward_flops(
            self.visual_tokens_per_image())
        return flops + sum(spec.encoder.forward_flops() for spec in self.experts)

    def forward_flops(self, seq_len: int, images: float = 1) -> float:
        """Forward FLOPs per sample with `seq_len` tokens (visual tokens included) and `images` real images: the LLM
        plus each image's experts, CoTR and projector."""
        return self.llm.forward_flops(seq_len) + images * self.image_forward_flops(seq_len)


def keyed_experts(experts: Mapping[str, Any], order: tuple[str, ...], where: str) -> tuple[dict, ...]:
    """`{name: {kind, encoder, processor, grid}}` + the names in model order -> entries in that order, each with
    its `name`."""
    require(sorted(order) == sorted(experts) and len(set(order)) == len(order),
            f"{where}.expert_order={order} must list every expert of {where}.experts once "
            f"({sorted(experts)}): it fixes their order (CoTR experts, projector input channels)")
    out = []
    for name in order:
        entry = experts[name]
        require(isinstance(entry, Mapping), f"{where}.experts.{name} must be a mapping, got {entry!r}")
        require(entry.get("name", name) == name,
                f"{where}.experts.{name}.name={entry.get('name')!r} differs from its key {name!r}")
        out.append({**entry, "name": name})
    return tuple(out)


def expert_dummy_inputs(spec: VisionExpertConfig) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Shapes of one image's encoder inputs (batch 1) from its encoder config: `image_size` pixels, or Pix2Struct's
    `max_patches` flattened patches (row and column ids + the patch's pixels)."""
    encoder = spec.encoder
    if spec.kind in PATCH_INPUT_KINDS:
        width = 2 + encoder.patch_embed_hidden_size
        return (jax.ShapeDtypeStruct((1, encoder.max_patches, width), jnp.float32),
                jax.ShapeDtypeStruct((1, encoder.max_patches), jnp.float32))
    size = encoder.image_size
    height, width = (size, size) if isinstance(size, int) else size
    return (jax.ShapeDtypeStruct((1, height, width, encoder.num_channels), jnp.float32),)


def expert_pixels(spec: VisionExpertConfig, x: jax.Array) -> jax.Array:
    """The encoder input from the pipeline's host output: uint8 pixels normalised with the encoder's mean/std
    (float32), Pix2Struct's already standardised patches as float32."""
    if spec.kind in PATCH_INPUT_KINDS:
        return jnp.asarray(x).astype(jnp.float32)
    encoder = spec.encoder
    return normalize(x, encoder.pixel_mean, encoder.pixel_std)


def expert_tokens(spec: VisionExpertConfig, encoder: nnx.Module, pixels: jax.Array,
                  patch_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(tokens [B, N, d], token mask [B, N]) of one expert for normalised inputs."""
    layout = ENCODER_OUTPUTS[spec.kind]
    out = encoder(pixels, patch_mask) if spec.kind in PATCH_INPUT_KINDS else encoder(pixels)
    if layout["feature_map"]:
        b, h, w, c = out.shape
        if spec.grid is not None and (h, w) != (spec.grid, spec.grid):
            out = jax.image.resize(out, (b, spec.grid, spec.grid, c), "bilinear")
        out = out.reshape(b, -1, c)
    elif layout["cls_token"]:
        out = out[:, 1:]
    mask = jnp.ones(out.shape[:2], bool) if patch_mask is None else patch_mask.astype(bool)
    return out, mask


def exchange_index(batch: Mapping[str, jax.Array]) -> jax.Array:
    """[B, T] int32: 1 + the number of supervised answers that end before each token within its sample (the
    exchange it belongs to: its user turn, images, assistant header and answer). Read from `loss_mask` (token t-1
    predicts an answer token at t), `segment_ids` and `positions` (without them: one sample per row); all 1 when
    the batch has no `loss_mask`."""
    segments = batch["segment_ids"]
    if "loss_mask" not in batch:
        return jnp.ones(segments.shape, jnp.int32)
    same = jnp.pad(segments[:, 1:] == segments[:, :-1], ((0, 0), (1, 0)))  # token t-1 is in t's sample
    answer = jnp.pad(batch["loss_mask"][:, :-1] > 0, ((0, 0), (1, 0))) & same  # token t is an answer token
    ended = jnp.pad(answer[:, :-1], ((0, 0), (1, 0))) & ~answer & same  # token t follows an answer's last token
    count = jnp.cumsum(ended.astype(jnp.int32), axis=1)
    index = jnp.broadcast_to(jnp.arange(segments.shape[1])[None, :], segments.shape)
    start = index - batch["positions"] if "positions" in batch else jnp.zeros_like(index)  # each sample's 1st token
    return 1 + count - jnp.take_along_axis(count, jnp.clip(start, 0, segments.shape[1] - 1), axis=1)


class LeoMini(nnx.Module):
    def __init__(self, cfg: LeoMiniConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.specs = cfg.experts
        self.experts = nnx.Dict({s.name: model_classes(s.kind)[1](s.encoder, rngs=rngs) for s in self.specs})
        self.cotr = CoTR(cfg.cotr_config, rngs=rngs)
        self.projector = MLPProjector(cfg.projector_config, rngs=rngs)
        self.llm = CausalLM(cfg.llm, rngs=rngs)

    @property
    def language_model(self) -> CausalLM:
        return self.llm

    def visual_tokens(self, batch: Mapping[str, jax.Array], text: jax.Array, text_mask: jax.Array) -> jax.Array:
        """Per image: experts -> CoTR (conditioned on the pooled prompt of its sample) -> projector.
        Returns [B, M, N^V, d_llm]; `text` [B, M, 1, d] pooled prompts with `text_mask` [B, M, 1]. With
        `visual_index` in the batch (a visual budget) only the listed images run; the other slots get zeros."""
        b, m = batch["image_mask"].shape
        index = batch.get("visual_index")
        features, masks = self._expert_features(batch, index)
        if index is None:
            text, text_mask = text.reshape(b * m, 1, -1), text_mask.reshape(b * m, 1)
        else:
            text, text_mask = gather_slots(text, index), gather_slots(text_mask, index)
        reduced = self.cotr(features, text, feature_masks=masks, text_mask=text_mask)
        tokens = self.projector(reduced)
        if index is None:
            return tokens.reshape(b, m, *tokens.shape[1:])
        return scatter_slots(tokens, index, b, m)

    def cotr_attention(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """CoTR's attention weights for a model batch, per expert name: [B, M, N^V, N_i] (fp32), row q = what
        visual token q of each image looks at among the expert's N_i tokens (its token grid, row-major), given the
        image's prompt. The same computation as the forward pass: the weights that make its visual tokens."""
        b, m = batch["image_mask"].shape
        text, has_text, _ = self.conditioning(batch)
        features, masks = self._expert_features(batch)
        weights = self.cotr.attention(features, text.reshape(b * m, 1, -1), feature_masks=masks,
                                      text_mask=has_text.reshape(b * m, 1))
        return {spec.name: w.reshape(b, m, *w.shape[1:]) for spec, w in zip(self.specs, weights)}

    def _expert_features(self, batch: Mapping[str, jax.Array],
                         index: jax.Array | None = None) -> tuple[list[jax.Array], list[jax.Array]]:
        """Every expert's tokens [I, N_i, d_i] and token masks [I, N_i] (False for empty image slots): the I = B*M
        image slots, or the G*n entries of a visual budget's `index` [G, n] (unused entries masked)."""
        features, masks = [], []
        b, m = batch["image_mask"].shape

        def items(x):
            if index is None:
                return x.reshape(b * m, *x.shape[2:])
            return constrain(gather_slots(x, index), ("batch",) + (None,) * (x.ndim - 2))

        valid = items(batch["image_mask"])
        if index is not None:
            valid = valid & (index.reshape(-1) >= 0)
        for spec, (n_tokens, _) in zip(self.specs, self.cfg.expert_shapes):
            x = expert_pixels(spec, items(batch[spec.batch_key]))
            if spec.kind in PATCH_INPUT_KINDS:
                patch_mask = items(batch[f"patch_mask_{spec.name}"])
                tokens, mask = expert_tokens(spec, self.experts[spec.name], x, patch_mask)
            else:
                tokens, mask = expert_tokens(spec, self.experts[spec.name], x)
            if tokens.shape[1] != n_tokens:
                raise ValueError(f"expert {spec.name!r}: {tokens.shape[1]} tokens from inputs of shape {x.shape[1:]}, "
                                 f"but the model is built for {n_tokens} (its encoder's image_size); make the "
                                 f"processor's output size equal config.model.experts.{spec.name}.encoder.image_size "
                                 "or set the expert's grid")
            features.append(tokens)
            masks.append(mask & valid[:, None])
        return features, masks

    def conditioning(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The prompt text each image and each token is conditioned on (see `conditioning` in the module docstring):
        (pooled prompt per image slot [B, M, d] (sum or mean, as CoTR pools), whether it has any prompt token
        [B, M], mean prompt embedding per token [B, T, d] for the routers), all fp32."""
        cfg = self.cfg
        ids, segments = batch["input_ids"], batch["segment_ids"]
        embeds = self.llm.embed(ids).astype(jnp.float32)
        image_mask = batch["image_mask"]
        image_segments = batch.get("image_segment_ids", jnp.where(image_mask, 1, 0).astype(jnp.int32))
        prompt = batch["prompt_mask"].astype(bool) & (ids != cfg.image_context_id) & (segments > 0)
        exchange = exchange_index(batch)
        context = ids == cfg.image_context_id
        # the exchange holding each image slot: that of its <IMG_CONTEXT> run (slots fill in row order)
        slot = (jnp.cumsum(context, axis=1) - 1) // self.cotr.cfg.output_tokens  # visual tokens per image
        at_slot = context[:, None, :] & (slot[:, None, :] == jnp.arange(image_mask.shape[1])[None, :, None])
        image_exchange = jnp.max(jnp.where(at_slot, exchange[:, None, :], 0), axis=-1)
        owner = (prompt[:, None, :] & (segments[:, None, :] == image_segments[:, :, None])
                 & self._sees(exchange[:, None, :], image_exchange[:, :, None])).astype(jnp.float32)
        text = jnp.einsum("bmt,btd->bmd", owner, embeds)
        if self.cotr.cfg.pooling == "mean":
            text = text / jnp.maximum(jnp.sum(owner, axis=-1, keepdims=True), 1.0)
        same = (prompt[:, None, :] & (segments[:, None, :] == segments[:, :, None])
                & self._sees(exchange[:, None, :], exchange[:, :, None])).astype(jnp.float32)
        token_prompt = jnp.einsum("bts,bsd->btd", same, embeds) / jnp.maximum(jnp.sum(same, -1, keepdims=True), 1.0)
        return text, jnp.any(owner > 0, axis=-1), token_prompt

    def _sees(self, key_exchange: jax.Array, query_exchange: jax.Array) -> jax.Array:
        """Whether prompt tokens of exchange `key_exchange` condition what belongs to `query_exchange`."""
        if self.cfg.conditioning == "turns_so_far":
            return key_exchange <= query_exchange
        if self.cfg.conditioning == "first_turn":
            return key_exchange == 1
        return jnp.ones(jnp.broadcast_shapes(key_exchange.shape, query_exchange.shape), bool)

    def embed_inputs(self, batch: Mapping[str, jax.Array], *, rng: jax.Array | None = None,
                     deterministic: bool = True) -> tuple[jax.Array, RoutingContext]:
        """Text embeddings with the visual tokens written at the <IMG_CONTEXT> positions, and the MMoE routing
        context (mean visual token of each token's own sample and its prompt conditioning)."""
        del rng, deterministic  # the experts run deterministically (frozen in stages 1 and 3)
        cfg = self.cfg
        ids = batch["input_ids"]
        segments = batch["segment_ids"]
        text_embeds = self.llm.embed(ids)
        image_mask = batch["image_mask"]
        image_segments = batch.get("image_segment_ids", jnp.where(image_mask, 1, 0).astype(jnp.int32))
        text, has_text, token_prompt = self.conditioning(batch)
        visual = self.visual_tokens(batch, text[:, :, None, :], has_text[:, :, None])
        tokens_per_image = visual.shape[2]
        visual_mask = jnp.repeat(image_mask, tokens_per_image, axis=1)
        visual = visual.reshape(visual.shape[0], -1, visual.shape[-1])
        context = ids == cfg.image_context_id
        check_context_tokens(context, visual_mask, "LEO-MINI")
        embeds = scatter_visual_tokens(text_embeds, context, visual)
        routing = RoutingContext(
            visual=per_token_context(visual, jnp.repeat(image_segments, tokens_per_image, axis=1) * visual_mask,
                                     segments),
            prompt=token_prompt)
        return embeds, routing

    def train_forward(self, batch: Mapping[str, jax.Array], *, rng: jax.Array | None = None,
                      deterministic: bool = True) -> DecoderOutput:
        embeds, routing = self.embed_inputs(batch, rng=rng, deterministic=deterministic)
        out = self.llm.forward(embeds, segment_ids=batch["segment_ids"], positions=batch["positions"],
                               routing=routing)
        visual_mask = jnp.repeat(batch["image_mask"], self.cotr.cfg.output_tokens, axis=1)
        mismatch = check_context_tokens(batch["input_ids"] == self.cfg.image_context_id, visual_mask, "LEO-MINI")
        return out._replace(aux={**out.aux, "visual_token_mismatch": mismatch})
