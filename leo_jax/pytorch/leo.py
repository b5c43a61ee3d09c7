"""PyTorch LEO with the official LEO module names (github.com/Mozhgan91/LEO, `LeoModel`): the export target of
`leo_jax.convert.leo`. `LeoModel.from_pretrained(dir)` builds it from the exported config.json (the official fields
only) and loads model.safetensors with `load_state_dict(strict=True)`.

Parts: `vision_model_1` InternViT in the original OpenGVLab layout (written here: it is remote code, not in
transformers), `vision_model_2` transformers' `SamVisionEncoder` (the same names as LEO's own copy), `mlp1`/`mlp2`
the projectors, `language_model` InternLM2ForCausalLM (written here with InternLM2's own names: fused `wqkv`
grouped per KV head, w1/w3/w2) or transformers Llama/Qwen2ForCausalLM.

Inputs are the official model's: `pixel_values` [N, 3, t, t] (every tile of the batch, InternViT-normalised),
`pixel_values_sam` [N, 3, S, S] (the same tiles resized to SAM's input and normalised: leo_jax builds these on the
device from the uint8 tiles, the same PIL-bilinear enlargement), `image_flags` [N] (1 = real tile, 0 = padding
slot), `input_ids` [B, T] with `img_context_token_id` where the visual tokens go. Depends on torch, transformers and
safetensors only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from leo_jax.jsonfile import read_json
from leo_jax.pytorch.cotr import LeoProjector, pixel_shuffle_internvl, pixel_unshuffle_tokens
from leo_jax.sampling import SamplingConfig

_CONFIG_META = ("model_type", "architectures", "transformers_version", "auto_map", "torch_dtype", "dtype")


def _act(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


# ---- InternViT (original OpenGVLab layout) -------------------------------------------------------------------------

class InternVisionEmbeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, p, size = cfg["hidden_size"], cfg["patch_size"], cfg["image_size"]
        self.grid = size // p
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(cfg.get("num_channels", 3), d, kernel_size=p, stride=p)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid ** 2 + 1, d))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values)  # [B, D, h, w]
        b, d, h, w = patches.shape
        pos = self.position_embedding[:, 1:]
        if (h, w) != (self.grid, self.grid):  # as the original: bicubic resize of the position grid
            grid = pos.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2).float()
            pos = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            pos = pos.reshape(1, d, h * w).permute(0, 2, 1).to(patches.dtype)
        tokens = patches.flatten(2).transpose(1, 2) + pos
        cls = (self.class_embedding + self.position_embedding[:, :1]).expand(b, -1, -1)
        return torch.cat([cls, tokens], dim=1)


class InternAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.get("qkv_bias", True))
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class InternMLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.act = _act(cfg.get("hidden_act", "gelu"))
        self.fc1 = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"])
        self.fc2 = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-6)
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.attn, self.mlp = InternAttention(cfg), InternMLP(cfg)
        self.ls1 = nn.Parameter(torch.ones(d))
        self.ls2 = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))


class InternVisionModel(nn.Module):
    """pixel_values [B, 3, H, W] -> hidden_states[select_layer] [B, 1 + N, D] (CLS first), as the original."""

    def __init__(self, cfg: dict):
        super().__init__()
        if cfg.get("qk_normalization", False) or cfg.get("norm_type", "layer_norm") != "layer_norm":
            raise ValueError("vision_config_1: only the InternViT-300M architecture (LayerNorm, no qk norm) is built")
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        hidden = [self.embeddings(pixel_values)]
        for layer in self.encoder.layers:
            hidden.append(layer(hidden[-1]))
        return hidden[select_layer]


# ---- InternLM2 (original names) ------------------------------------------------------------------------------------

class InternLM2RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class InternLM2Rotary(nn.Module):
    """InternLM2's RoPE: default, 'linear' (positions / factor) and 'dynamic' NTK (base grows once the sequence is
    longer than max_position_embeddings)."""

    def __init__(self, cfg: dict, head_dim: int):
        super().__init__()
        self.dim, self.base = head_dim, float(cfg.get("rope_theta", 10000.0))
        self.max_positions = cfg.get("max_position_embeddings", 2048)
        scaling = cfg.get("rope_scaling") or {}
        self.kind = scaling.get("type", scaling.get("rope_type", "default"))
        if self.kind not in ("default", "linear", "dynamic"):
            raise ValueError(f"llm_config.rope_scaling={scaling}: InternLM2 knows 'linear' and 'dynamic' only")
        self.factor = float(scaling.get("factor", 1.0))

    def forward(self, position_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.base
        if self.kind == "dynamic" and seq_len > self.max_positions:
            base = base * ((self.factor * seq_len / self.max_positions) - (self.factor - 1)) ** (
                self.dim / (self.dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim))
        t = position_ids.float() / (self.factor if self.kind == "linear" else 1.0)
        freqs = t[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, T, D]


class InternLM2Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        e, self.num_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.num_kv_heads = cfg.get("num_key_value_heads") or self.num_heads
        self.head_dim = e // self.num_heads
        bias = cfg.get("bias", False)
        self.wqkv = nn.Linear(e, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, e, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """-> (output, (keys, values) of the cached and new positions); `past`: the cache of earlier positions."""
        b, t, _ = x.shape
        g = self.num_heads // self.num_kv_heads
        qkv = self.wqkv(x).view(b, t, self.num_kv_heads, g + 2, self.head_dim)  # per KV head: g queries, k, v
        q = qkv[:, :, :, :g].reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = qkv[:, :, :, g].transpose(1, 2), qkv[:, :, :, g + 1].transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1),
                                             attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1)), (k, v)


class InternLM2MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        e, f = cfg["hidden_size"], cfg["intermediate_size"]
        self.w1 = nn.Linear(e, f, bias=False)  # gate
        self.w3 = nn.Linear(e, f, bias=False)  # up
        self.w2 = nn.Linear(f, e, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.attention_norm = InternLM2RMSNorm(cfg["hidden_size"], eps)
        self.attention = InternLM2Attention(cfg)
        self.ffn_norm = InternLM2RMSNorm(cfg["hidden_size"], eps)
        self.feed_forward = InternLM2MLP(cfg)

    def forward(self, x, cos, sin, mask, past=None):
        attended, cache = self.attention(self.attention_norm(x), cos, sin, mask, past)
        x = x + attended
        return x + self.feed_forward(self.ffn_norm(x)), cache


class InternLM2Model(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(InternLM2DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = InternLM2RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))
        self.rotary = InternLM2Rotary(cfg, cfg["hidden_size"] // cfg["num_attention_heads"])


class InternLM2ForCausalLM(nn.Module):
    """InternLM2 decoder with the original checkpoint names; forward -> logits [B, T, vocab]."""

    def __init__(self, cfg: dict):
        super().__init__()
        if cfg.get("tie_word_embeddings", False):
            raise ValueError("llm_config.tie_word_embeddings=True: InternLM2 checkpoints have their own `output`")
        self.model = InternLM2Model(cfg)
        self.output = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_cached(input_ids, inputs_embeds, attention_mask, position_ids)[0]

    def decode_step(self, input_ids, inputs_embeds, attention_mask, position_ids, cache):
        """leo_jax.pytorch.generation's step: (last logits [B, vocab], cache)."""
        logits, cache = self.forward_cached(input_ids, inputs_embeds, attention_mask, position_ids, cache)
        return logits[:, -1], cache

    def forward_cached(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                       past: list | None = None) -> tuple[torch.Tensor, list]:
        """(logits [B, t, vocab], each layer's (keys, values) so far) for t new tokens after the cached `past`
        (None: none); attention_mask [B, cached + t] covers the cached and the new keys."""
        x = self.model.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        t0 = 0 if past is None else past[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(t0, t0 + t, device=x.device).expand(b, t)
        allowed = torch.ones(t, t0 + t, dtype=torch.bool, device=x.device).tril(t0)[None, None]
        if attention_mask is not None:  # keys that are padding are hidden; a position always sees itself
            allowed = allowed & attention_mask.bool()[:, None, None, :]
            itself = torch.arange(t, device=x.device)[:, None] + t0 == torch.arange(t0 + t, device=x.device)
            allowed = allowed | itself
        cos, sin = self.model.rotary(position_ids, int(position_ids.max()) + 1)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        cache = []
        for index, layer in enumerate(self.model.layers):
            x, kv = layer(x, cos, sin, allowed, None if past is None else past[index])
            cache.append(kv)
        return self.output(self.model.norm(x)), cache


def build_language_model(cfg: dict) -> nn.Module:
    """`llm_config` -> InternLM2ForCausalLM (written here) or transformers Llama/Qwen2ForCausalLM."""
    arch = (cfg.get("architectures") or ["InternLM2ForCausalLM"])[0]
    if arch == "InternLM2ForCausalLM":
        return InternLM2ForCausalLM(cfg)
    if arch in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        import transformers

        config_cls = transformers.LlamaConfig if arch == "LlamaForCausalLM" else transformers.Qwen2Config
        config = config_cls(**{k: v for k, v in cfg.items() if k not in _CONFIG_META})
        return getattr(transformers, arch)(config)
    raise ValueError(f"llm_config.architectures[0]={arch!r} is not supported")


# ---- LEO -----------------------------------------------------------------------------------------------------------

class LeoModel(nn.Module):
    """The official LEO forward: per tile, InternViT -> pixel shuffle -> mlp1 and SAM -> pixel_unshuffle -> mlp2,
    tokens alternated (out[0::2] InternViT, out[1::2] SAM), written at the <IMG_CONTEXT> positions of the LLM
    input embeddings in order."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import SamVisionConfig
        from transformers.models.sam.modeling_sam import SamVisionEncoder

        self.config = config
        vision_1, vision_2, llm = config["vision_config_1"], config["vision_config_2"], config["llm_config"]
        if config.get("ps_version", "v2") != "v2":
            raise ValueError(f"ps_version={config['ps_version']!r}: only 'v2' is built")
        self.select_layer = config.get("select_layer", -1)
        self.downsample_ratio, self.downsample_ratio2 = config["downsample_ratio"], int(config["downsample_ratio2"])
        self.img_context_token_id = config.get("img_context_token_id")
        self.vision_model_1 = InternVisionModel(vision_1)
        self.vision_model_2 = SamVisionEncoder(SamVisionConfig(
            **{k: v for k, v in vision_2.items() if k not in _CONFIG_META}))
        self.language_model = build_language_model(llm)
        d_llm = llm["hidden_size"]
        self.mlp1 = LeoProjector(int(vision_1["hidden_size"] / self.downsample_ratio ** 2), d_llm)
        self.mlp2 = LeoProjector(vision_2["output_channels"] * self.downsample_ratio2 ** 2, d_llm)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> LeoModel:
        """config.json + model.safetensors (or shards with an index) -> the model in `dtype`, eval mode, strictly
        loaded (a missing or unexpected tensor is an error naming it)."""
        from safetensors.torch import load_file

        path = Path(path)
        config = read_json(path / "config.json", "export a LEO model there first (`python -m leo_jax.convert "
                           "export-hf` writes it)", "re-export the model")
        model = cls(config)
        state = {}
        for file in sorted(path.glob("*.safetensors")):
            state.update(load_file(file))
        model.load_state_dict(state, strict=True)
        return model.to(dtype).eval()

    def extract_feature_vision_1(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.vision_model_1(pixel_values, self.select_layer)[:, 1:]
        h = w = int(x.shape[1] ** 0.5)
        x = pixel_shuffle_internvl(x.reshape(x.shape[0], h, w, -1), self.downsample_ratio)
        return self.mlp1(x.reshape(x.shape[0], -1, x.shape[-1]))

    def extract_feature_vision_2(self, pixel_values_sam: torch.Tensor) -> torch.Tensor:
        neck = self.vision_model_2(pixel_values_sam).last_hidden_state  # [N, C, H, W]
        return self.mlp2(pixel_unshuffle_tokens(neck, self.downsample_ratio2))

    def visual_tokens(self, pixel_values: torch.Tensor, pixel_values_sam: torch.Tensor) -> torch.Tensor:
        """[N tiles, 2 * n, d_llm]: the two encoders' tokens alternated, InternViT first."""
        first, second = self.extract_feature_vision_1(pixel_values), self.extract_feature_vision_2(pixel_values_sam)
        merged = first.new_empty(first.shape[0], 2 * first.shape[1], first.shape[2])
        merged[:, 0::2], merged[:, 1::2] = first, second
        return merged

    def forward(self, pixel_values: torch.Tensor, pixel_values_sam: torch.Tensor, input_ids: torch.Tensor,
                image_flags: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]."""
        embeds = self.embed_inputs(pixel_values, pixel_values_sam, input_ids, image_flags)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)
        return out if isinstance(out, torch.Tensor) else out.logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 pixel_values_sam: torch.Tensor | None = None, image_flags: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, **_ignored) -> torch.Tensor:
        """New tokens [B, max_new_tokens] for left-padded prompts (as `LeoProcessor` builds them), with a KV cache:
        greedy at temperature 0, else temperature / top-p sampling; a row emits pad_token_id after a stop id."""
        from leo_jax.pytorch.generation import decode, step_of

        if pixel_values is None:
            embeds = self.language_model.get_input_embeddings()(input_ids)
        else:
            embeds = self.embed_inputs(pixel_values, pixel_values_sam, input_ids, image_flags)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        opts = SamplingConfig.from_hf(max_new_tokens, temperature, top_p, eos_token_id, pad_token_id)
        max_positions = int(self.config["llm_config"].get("max_position_embeddings", 2048))
        return decode(step_of(self.language_model), embeds, mask, opts, max_positions, generator)

    def embed_inputs(self, pixel_values: torch.Tensor, pixel_values_sam: torch.Tensor, input_ids: torch.Tensor,
                     image_flags: torch.Tensor | None = None) -> torch.Tensor:
        """The LLM input embeddings [B, T, D] with the tiles' visual tokens at the <IMG_CONTEXT> positions."""
        if self.img_context_token_id is None or self.img_context_token_id < 0:
            raise ValueError("img_context_token_id is not set: assign the tokenizer's <IMG_CONTEXT> id to "
                             "model.img_context_token_id")
        visual = self.visual_tokens(pixel_values, pixel_values_sam)
        per_tile = visual.shape[1]
        if image_flags is not None:
            visual = visual[image_flags.reshape(-1) == 1]
        embeds = self.language_model.get_input_embeddings()(input_ids).clone()
        selected = input_ids == self.img_context_token_id
        visual = visual.reshape(-1, embeds.shape[-1])
        if int(selected.sum()) != visual.shape[0]:
            raise ValueError(f"input_ids hold {int(selected.sum())} <IMG_CONTEXT> tokens but the tiles give "
                             f"{visual.shape[0]} visual tokens ({per_tile} per tile); the prompt needs that many per "
                             f"real tile (image_flags == 1)")
        embeds[selected] = visual.to(embeds.dtype)
        return embeds
