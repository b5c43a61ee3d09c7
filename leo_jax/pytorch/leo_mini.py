"""A compact PyTorch LEO-MINI, built only from torch, transformers' standard modules and this package's
torch modules: the target of `leo_jax.convert` family 'leo_mini' exports, loadable, runnable and fine-tunable
without JAX.

    vision experts (transformers CLIP / SigLIP / ConvNeXt / Pix2Struct / SAM / InternVL vision, leo_jax EVA-02)
      -> each expert's tokens as leo_jax.models.leo_mini.expert_tokens takes them (its output layer, CLS dropped,
         feature maps resized to the expert's grid)
      -> CoTR (leo_jax.pytorch.cotr), conditioned on the pooled prompt embeddings the image sees
      -> projector (Linear -> GELU -> Linear) -> visual tokens written at the <IMG_CONTEXT> positions
      -> transformers LlamaForCausalLM / Qwen2ForCausalLM whose target projections are MMoE LoRA linears
         (leo_jax.pytorch.mmoe.MMoELinear), routed per layer from the layer's normalised input, the sample's mean
         visual token and the mean prompt embedding each token sees.

Multi-turn conditioning is leo_jax.models.leo_mini's (config.json `conditioning`): with 'turns_so_far' every token of
exchange k (its user turn, images and answer) and every image of it see the user turns 1..k; 'first_turn' the
first user turn; 'all_turns' every user turn of the row. Exchanges are read from `answer_mask` (a new one starts
after each answer), as leo_jax reads them from its loss mask; without it the row is one exchange.

Everything the model needs is in the export's config.json (see leo_jax.convert.leo_mini for the tensor names):
`vision_experts` (name, kind, the expert's own HF config, output layer/stage, grid), `cotr`, `projector`,
`text_config` (the LLM's HF config), `mmoe`, `image_context_id`, `conditioning`. One sample per batch row (no
packing), left or right padding marked by `attention_mask`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from leo_jax.jsonfile import read_json
from leo_jax.pytorch.cotr import CoTR, MiniProjector
from leo_jax.pytorch.eva02 import Eva
from leo_jax.pytorch.mmoe import MMoELinear, balance_loss
from leo_jax.sampling import SamplingConfig

# expert kind -> (transformers config class, model class, how its output becomes tokens). EVA-02 is this package's.
EXPERT_KINDS = {
    "clip_vision": ("CLIPVisionConfig", "CLIPVisionModel", "cls_token"),
    "siglip_vision": ("SiglipVisionConfig", "SiglipVisionModel", "tokens"),
    "intern_vit": ("InternVLVisionConfig", "InternVLVisionModel", "cls_token"),
    "pix2struct_vision": ("Pix2StructVisionConfig", "Pix2StructVisionModel", "tokens"),
    "convnext": ("ConvNextConfig", "ConvNextModel", "feature_map"),
    "sam_vision": ("SamVisionConfig", "SamVisionModel", "feature_map"),
    "eva02": (None, "Eva", "cls_token"),
}
CAUSAL_LMS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CONDITIONING = ("turns_so_far", "first_turn", "all_turns")  # leo_jax.models.leo_mini.CONDITIONING
# config.json fields that are not constructor arguments of the transformers config classes
_NOT_CONFIG_ARGS = ("model_type", "transformers_version", "stage_names")


def _transformers_config(class_name: str, fields: Mapping, where: str):
    import transformers

    if not isinstance(fields, Mapping):
        raise ValueError(f"config.json: {where} must be an object (a {class_name}), got {fields!r}")
    return getattr(transformers, class_name)(**{k: v for k, v in fields.items() if k not in _NOT_CONFIG_ARGS})


def eva_from_config(fields: Mapping) -> Eva:
    """leo_jax.pytorch.eva02.Eva from the eva02 family's config.json fields (timm's Eva arguments)."""
    args = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_fused",
            "scale_mlp", "scale_attn_inner", "ref_feat_shape", "global_pool")
    kwargs = {k: fields[k] for k in args if k in fields}
    for key in ("img_size", "ref_feat_shape"):  # int or [height, width]
        value = kwargs.get(key)
        if value is not None:
            kwargs[key] = (value, value) if isinstance(value, int) else tuple(value)
    return Eva(**kwargs)


class ExpertSpec:
    """How one vision expert's encoder output becomes tokens (leo_jax.models.leo_mini.expert_tokens): its kind,
    output layer (token encoders: HF hidden_states[k], -1 = last_hidden_state; SigLIP with or without its post-LN) or
    stage (ConvNeXt), and feature-map grid."""

    def __init__(self, spec: Mapping):
        self.name, self.kind = spec.get("name"), spec.get("kind")
        if self.kind not in EXPERT_KINDS:
            raise ValueError(f"config.json: vision expert {self.name!r} has kind {self.kind!r}; supported: "
                             f"{sorted(EXPERT_KINDS)}")
        self.config_class, self.model_class, self.layout = EXPERT_KINDS[self.kind]
        self.config = spec["config"]
        self.grid = spec.get("grid")
        self.output_layer = int(spec.get("output_layer", -1))
        self.output_stage = int(spec.get("output_stage", -1))
        self.interpolate_pos_encoding = bool(spec.get("interpolate_pos_encoding", False))
        self.post_norm = bool(spec.get("post_norm", True))  # SigLIP: post_layernorm on the selected layer

    def build(self) -> nn.Module:
        """The encoder, whose state-dict names are the expert's own HF (timm for EVA-02) names."""
        if self.kind == "eva02":
            return eva_from_config(self.config)
        import transformers

        config = _transformers_config(self.config_class, self.config, f"vision_experts[{self.name}].config")
        return getattr(transformers, self.model_class)(config)

    def tokens(self, encoder: nn.Module, inputs: torch.Tensor, patch_mask: torch.Tensor | None = None):
        """Encoder inputs (normalised NCHW pixels; Pix2Struct: flattened patches [B, P, D] with `patch_mask`
        [B, P]) -> tokens [B, N, d]."""
        hidden = self.output_layer != -1
        if self.kind == "eva02":
            out = encoder.forward_features(inputs, return_hidden_states=hidden)
            tokens = out[1][self.output_layer] if hidden else out
        elif self.kind == "convnext":
            maps = encoder(inputs, output_hidden_states=True).hidden_states  # stem output, then every stage
            tokens = maps[1:][self.output_stage]
        elif self.kind == "sam_vision":
            tokens = encoder(inputs).last_hidden_state
        else:
            kwargs = dict(output_hidden_states=hidden)
            if self.kind == "pix2struct_vision":
                kwargs.update(flattened_patches=inputs, attention_mask=patch_mask)
            else:
                kwargs["pixel_values"] = inputs
                if self.kind in ("clip_vision", "siglip_vision"):
                    kwargs["interpolate_pos_encoding"] = self.interpolate_pos_encoding
            if self.kind == "siglip_vision":  # post_layernorm on any selected layer, as leo_jax's SigLIP
                tokens = encoder(**{**kwargs, "output_hidden_states": True}).hidden_states[self.output_layer]
                tokens = encoder.post_layernorm(tokens) if self.post_norm else tokens
            else:
                out = encoder(**kwargs)
                tokens = out.hidden_states[self.output_layer] if hidden else out.last_hidden_state
        if self.layout == "feature_map":  # NCHW map -> (resized, antialiased like jax.image.resize) row-major tokens
            if self.grid is not None and tuple(tokens.shape[-2:]) != (self.grid, self.grid):
                tokens = F.interpolate(tokens, size=(self.grid, self.grid), mode="bilinear", align_corners=False,
                                       antialias=True)
            tokens = tokens.flatten(2).transpose(1, 2)
        elif self.layout == "cls_token":
            tokens = tokens[:, 1:]
        return tokens


class LeoMiniForCausalLM(nn.Module):
    """LEO-MINI from an export's config.json dict. `forward(input_ids, images, ...)` -> the causal LM output
    (logits [B, T, vocab], and the loss when `labels` are given, as transformers computes it)."""

    def __init__(self, config: Mapping):
        super().__init__()
        import transformers

        self.config = dict(config)
        for key in ("vision_experts", "cotr", "projector", "text_config", "mmoe", "image_context_id"):
            if key not in config:
                raise ValueError(f"config.json lacks {key!r}: not a LEO-MINI export (write one with "
                                 f"leo_jax.convert.api.export_module(model, 'leo_mini', out_dir))")
        self.image_context_id = int(config["image_context_id"])
        # exports written before the option existed: leo_jax's default (on one-turn data all options agree)
        self.conditioning = config.get("conditioning", "turns_so_far")
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"config.json: conditioning={self.conditioning!r}; use one of {CONDITIONING}")
        self.expert_specs = [ExpertSpec(spec) for spec in config["vision_experts"]]
        self.vision_experts = nn.ModuleDict({spec.name: spec.build() for spec in self.expert_specs})
        cotr = config["cotr"]
        mode = cotr.get("mode", "cotr")
        # visual tokens per image: CoTR's queries, or every expert token when nothing is reduced
        self.num_queries = int(cotr["expert_tokens"][0] if mode == "keep_all" else cotr["num_queries"])
        self.cotr = CoTR(cotr["expert_widths"], cotr["text_width"], int(cotr["num_queries"]), cotr["proj_width"],
                         cotr["pooling"], cotr["scale"], visual_bias=cotr.get("visual_bias", True),
                         spatial_prior=cotr.get("spatial_prior", 0.0), text_bias=cotr.get("text_bias", True),
                         mode=mode)
        projector = config["projector"]
        if projector.get("act", "gelu") != "gelu" or projector.get("layer_norm", False):
            raise ValueError(f"config.json: projector {projector} is not LEO-MINI's Linear -> GELU -> Linear")
        self.projector = MiniProjector(projector["in_features"], projector["out_features"])
        text = config["text_config"]
        if text.get("model_type") not in CAUSAL_LMS:
            raise ValueError(f"config.json: text_config.model_type={text.get('model_type')!r}; the PyTorch LEO-MINI "
                             f"supports {sorted(CAUSAL_LMS)}")
        config_class, model_class = CAUSAL_LMS[text["model_type"]]
        self.language_model = getattr(transformers, model_class)(_transformers_config(config_class, text,
                                                                                      "text_config"))
        self.mmoe_layers = [self._install_mmoe(layer, config["mmoe"]) for layer in self.language_model.model.layers]
        self._routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def _install_mmoe(self, layer: nn.Module, mmoe: Mapping) -> list[MMoELinear]:
        """Wraps the layer's target projections in MMoELinear. As in leo_jax, one router per layer: it lives in the
        first target's module; the other targets reuse its gates. Routed from the input_layernorm output."""
        hidden = self.language_model.config.hidden_size
        wrapped = []
        for target in mmoe["targets"]:
            owner = layer.self_attn if target in ATTENTION_TARGETS else layer.mlp
            module = MMoELinear(getattr(owner, target), hidden, mmoe["num_experts"], mmoe["rank"], mmoe["alpha"],
                                mmoe["general_rank"], mmoe["general_alpha"], mmoe["top_k"], mmoe["router_cond_dim"],
                                mmoe["router_hidden"], mmoe["gate_mode"], mmoe["renormalize"])
            if wrapped:
                del module.router
            setattr(owner, target, module)
            wrapped.append(module)

        def route(norm, inputs, h):  # forward hook: leaves the norm's output unchanged
            if self._routing is None:
                raise RuntimeError("LeoMiniForCausalLM: run the model through forward(), which sets the routing "
                                   "context of the MMoE experts")
            wrapped[0].set_routing(h, *self._routing)
            for other in wrapped[1:]:
                other.gates, other.probs = wrapped[0].gates, wrapped[0].probs

        layer.input_layernorm.register_forward_hook(route)
        return wrapped

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None) -> LeoMiniForCausalLM:
        """Builds the model from `path`/config.json and loads its safetensors strictly (every tensor, no extras);
        in eval mode, like transformers' from_pretrained. `dtype` defaults to the export's."""
        from safetensors.torch import load_file

        path = Path(path)
        config_file = path / "config.json"
        config = read_json(config_file, "export a LEO-MINI model there first", "re-export the model")
        if config.get("model_type") != "leo_mini":
            raise ValueError(f"{config_file}: model_type={config.get('model_type')!r}, expected 'leo_mini'")
        index = path / "model.safetensors.index.json"
        files = ["model.safetensors"]
        if index.is_file():
            shards = read_json(index, "the list of weight shards", "re-export the model")
            weight_map = shards.get("weight_map") if isinstance(shards, dict) else None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} lacks a 'weight_map' object (tensor name -> shard file): re-export the "
                                 "model")
            files = sorted(set(weight_map.values()))
        state = {}
        for name in files:
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found (LEO-MINI weights)")
            state.update(load_file(path / name))
        model = cls(config)
        model.load_weights(state, str(path))
        dtype = dtype or getattr(torch, config.get("dtype") or "float32")
        return model.to(dtype).eval()

    def load_weights(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load: a missing or unexpected tensor is an error naming it (tied lm_head aside)."""
        tied = ["language_model.lm_head.weight"] if self.language_model.config.tie_word_embeddings else []
        result = self.load_state_dict(dict(state), strict=False)
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise ValueError(f"{source}: missing tensors {missing[:8]}, unexpected tensors "
                             f"{result.unexpected_keys[:8]}: the weights do not match config.json")
        if tied:
            self.language_model.tie_weights()

    def visual_tokens(self, images: Mapping[str, torch.Tensor], patch_masks: Mapping[str, torch.Tensor],
                      image_mask: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Experts -> CoTR -> projector for images [B, M, ...], each conditioned on its pooled prompt text [B, M, d]
        (`text_mask` [B, M]: whether it has any prompt token): -> [B, M * N^V, d_llm]."""
        b, m = image_mask.shape
        features, masks = [], []
        for spec in self.expert_specs:
            name, encoder = spec.name, self.vision_experts[spec.name]
            if name not in images:
                raise ValueError(f"LeoMiniForCausalLM: no inputs for vision expert {name!r}; pass images[{name!r}] "
                                 f"(experts: {list(self.vision_experts)})")
            x = images[name]
            x = x.reshape(b * m, *x.shape[2:])
            if spec.kind == "pix2struct_vision":
                if name not in patch_masks:
                    raise ValueError(f"LeoMiniForCausalLM: Pix2Struct expert {name!r} needs patch_masks[{name!r}]")
                patch_mask = patch_masks[name].reshape(b * m, -1)
                tokens, mask = spec.tokens(encoder, x, patch_mask), patch_mask.bool()
            else:
                tokens = spec.tokens(encoder, x)
                mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            features.append(tokens)
            masks.append(mask & image_mask.reshape(b * m, 1))
        reduced = self.cotr(features, text.reshape(b * m, 1, -1), masks, text_mask.reshape(b * m, 1))
        return self.projector(reduced).reshape(b, m * self.num_queries, -1)

    def forward(self, input_ids: torch.Tensor, images: Mapping[str, torch.Tensor],
                attention_mask: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, patch_masks: Mapping[str, torch.Tensor] | None = None,
                labels: torch.Tensor | None = None, answer_mask: torch.Tensor | None = None, **kwargs):
        """input_ids [B, T] with N^V <IMG_CONTEXT> ids per image; images[expert] [B, M, ...]: each expert's encoder
        inputs for M image slots per sample; attention_mask [B, T] (1 = real token); prompt_mask [B, T]
        (1 = prompt token, which conditions CoTR and the routers; default: every real token); image_mask [B, M]
        (default all images real; real ones first); patch_masks[expert] for Pix2Struct; labels as transformers';
        answer_mask [B, T] (1 = assistant answer token, terminator included: where the exchanges of a multi-turn
        row end; default: one exchange)."""
        inputs_embeds, attention_mask, routing = self.embed_inputs(input_ids, images, attention_mask, prompt_mask,
                                                                   image_mask, patch_masks, answer_mask)
        self._routing = routing
        try:
            return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(),
                                       labels=labels, **kwargs)
        finally:
            self._routing = None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, images: Mapping[str, torch.Tensor] | None = None,
                 attention_mask: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                 image_mask: torch.Tensor | None = None, patch_masks: Mapping[str, torch.Tensor] | None = None,
                 answer_mask: torch.Tensor | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, **_ignored) -> torch.Tensor:
        """New tokens [B, max_new_tokens] for left-padded prompts (as `LeoProcessor` builds them, history answers
        marked in `answer_mask`), with the LLM's KV cache: greedy at temperature 0, else temperature / top-p
        sampling; a row emits pad_token_id after a stop id. Prompt tokens are routed with their own context; new
        tokens continue the last exchange: the context of the prompt's last token (as leo_jax's engine)."""
        from leo_jax.pytorch.generation import decode, step_of

        inputs_embeds, mask, routing = self.embed_inputs(input_ids, images, attention_mask, prompt_mask, image_mask,
                                                         patch_masks, answer_mask)
        opts = SamplingConfig.from_hf(max_new_tokens, temperature, top_p, eos_token_id, pad_token_id)
        step, new_tokens = step_of(self.language_model), tuple(x[:, -1:] for x in routing)

        def routed_step(ids, embeds, step_mask, positions, cache):
            self._routing = routing if cache is None else new_tokens
            return step(ids, embeds, step_mask, positions, cache)

        try:
            return decode(routed_step, inputs_embeds, mask, opts,
                          int(self.language_model.config.max_position_embeddings), generator)
        finally:
            self._routing = None

    def embed_inputs(self, input_ids: torch.Tensor, images: Mapping[str, torch.Tensor] | None,
                     attention_mask: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                     image_mask: torch.Tensor | None = None, patch_masks: Mapping[str, torch.Tensor] | None = None,
                     answer_mask: torch.Tensor | None = None):
        """(LLM input embeddings [B, T, D] with the visual tokens at the <IMG_CONTEXT> positions, attention mask
        [B, T], routing context: the sample's mean visual token [B, 1, d] and each token's mean prompt embedding
        [B, T, d]), as `forward` takes."""
        b, t = input_ids.shape
        if not images:
            raise ValueError("LeoMiniForCausalLM: images is empty; pass each vision expert's inputs [B, M, ...]")
        num_images = next(iter(images.values())).shape[1]
        device = input_ids.device
        attention_mask = torch.ones(b, t, dtype=torch.bool, device=device) if attention_mask is None \
            else attention_mask.bool()
        prompt_mask = attention_mask if prompt_mask is None else prompt_mask.bool() & attention_mask
        image_mask = torch.ones(b, num_images, dtype=torch.bool, device=device) if image_mask is None \
            else image_mask.bool()

        embeds = self.language_model.get_input_embeddings()(input_ids)
        context = (input_ids == self.image_context_id) & attention_mask
        prompt = prompt_mask & ~context
        text, has_text, token_prompt = self.conditioning_text(embeds, prompt, context, image_mask.shape[1],
                                                              self.exchanges(attention_mask, answer_mask))
        visual = self.visual_tokens(images, patch_masks or {}, image_mask, text, has_text)
        visual_mask = image_mask.repeat_interleave(self.num_queries, 1)
        context_counts, visual_counts = context.sum(1), visual_mask.sum(1)
        if not torch.equal(context_counts, visual_counts):
            row = int(torch.nonzero(context_counts != visual_counts)[0, 0])
            raise ValueError(f"LeoMiniForCausalLM: batch row {row} has {int(context_counts[row])} <IMG_CONTEXT> "
                             f"tokens (id {self.image_context_id}) but {int(visual_counts[row])} visual tokens "
                             f"({self.num_queries} per real image)")
        inputs_embeds = embeds.masked_scatter(context[..., None], visual[visual_mask].to(embeds.dtype))
        # routing context: each sample's mean visual token [B, 1, d], each token's mean prompt embedding [B, T, d]
        vmask = visual_mask.to(visual.dtype)[..., None]
        mean_visual = (visual * vmask).sum(1, keepdim=True) / vmask.sum(1, keepdim=True).clamp(min=1.0)
        return inputs_embeds, attention_mask, (mean_visual, token_prompt)

    @staticmethod
    def exchanges(attention_mask: torch.Tensor, answer_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, T] long: 1 + the number of answers that end before each token (its exchange); all 1 without
        `answer_mask`."""
        if answer_mask is None:
            return torch.ones(attention_mask.shape, dtype=torch.long, device=attention_mask.device)
        answer = answer_mask.bool() & attention_mask
        ended = F.pad(answer[:, :-1], (1, 0)) & ~answer  # token t follows an answer's last token
        return 1 + ended.long().cumsum(1)

    def _sees(self, key: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Whether prompt tokens of exchange `key` condition what belongs to exchange `query` (broadcast)."""
        if self.conditioning == "turns_so_far":
            return key <= query
        shape = torch.broadcast_shapes(key.shape, query.shape)
        if self.conditioning == "first_turn":
            return (key == 1).expand(shape)
        return torch.ones(shape, dtype=torch.bool, device=key.device)

    def conditioning_text(self, embeds: torch.Tensor, prompt: torch.Tensor, context: torch.Tensor, slots: int,
                          exchange: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompt text each image slot and each token sees (`conditioning`): (pooled prompt per slot
        [B, M, d], pooled as CoTR pools; whether it has any prompt token [B, M]; mean prompt embedding per token
        [B, T, d] for the routers). An image belongs to the exchange of its <IMG_CONTEXT> run (slots fill in row
        order)."""
        slot = (context.long().cumsum(1) - 1).div(self.num_queries, rounding_mode="floor")
        at_slot = context[:, None, :] & (slot[:, None, :] == torch.arange(slots, device=slot.device)[None, :, None])
        image_exchange = torch.where(at_slot, exchange[:, None, :], 0).amax(-1)  # [B, M]
        owner = (prompt[:, None, :] & self._sees(exchange[:, None, :], image_exchange[:, :, None])).to(embeds.dtype)
        text = torch.einsum("bmt,btd->bmd", owner, embeds)
        if self.cotr.pooling == "mean":
            text = text / owner.sum(-1, keepdim=True).clamp(min=1.0)
        same = (prompt[:, None, :] & self._sees(exchange[:, None, :], exchange[:, :, None])).to(embeds.dtype)
        token_prompt = torch.einsum("bts,bsd->btd", same, embeds) / same.sum(-1, keepdim=True).clamp(min=1.0)
        return text, owner.sum(-1) > 0, token_prompt

    def router_probs(self) -> list[torch.Tensor]:
        """Every layer's router probabilities [B, T, E] from the last forward."""
        return [layer[0].probs for layer in self.mmoe_layers]

    def balance_loss(self, token_mask: torch.Tensor) -> torch.Tensor:
        """Switch balance loss of the last forward, averaged over layers (leo_jax weights it 0.05 in training)."""
        return torch.stack([balance_loss(p, token_mask) for p in self.router_probs()]).mean()
