"""Autoregressive decoding for the PyTorch LEO / LEO-MINI with a KV cache: one prefill over the left-padded prompt
embeddings, then one token per step. The same rules as leo_jax's JAX decoder: positions count each row's real
tokens (left padding takes none), temperature 0 is greedy, top_p keeps the smallest set of tokens whose probability
reaches it, and after a stop token a row emits the pad id (`leo_jax.sampling.SamplingConfig`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from leo_jax.sampling import SamplingConfig


def sample_token(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits [B, V]: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits = logits.sort(-1, descending=True).values
        probs = sorted_logits.softmax(-1)
        keep = (probs.cumsum(-1) - probs) < top_p  # the mass before a token is < top_p: the top token always stays
        threshold = torch.where(keep, sorted_logits, torch.full_like(sorted_logits, float("inf"))).amin(-1, True)
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] of left-padded rows: 0 at each row's first real token (padding clamped to 0)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


StepFn = Callable[[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, object],
                  tuple[torch.Tensor, object]]


def step_of(language_model) -> StepFn:
    """The decode step of a language model: its own `decode_step` (leo_jax's InternLM2), else transformers'."""
    return getattr(language_model, "decode_step", None) or transformers_step(language_model)


@torch.no_grad()
def decode(step: StepFn, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, opts: SamplingConfig,
           max_positions: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """New tokens [B, max_new_tokens] after left-padded prompt embeddings [B, T, D] (attention_mask 1 on real
    tokens). `step(input_ids, inputs_embeds, attention_mask, position_ids, cache) -> (last logits [B, V], cache)`
    runs the language model on new tokens (cache None on the prefill). A row whose prompt and new tokens exceed
    `max_positions` (the LLM's max_position_embeddings) is an error."""
    mask = attention_mask.long()
    if not bool(mask[:, -1].all()):
        raise ValueError("generate: prompts must be left-padded (attention_mask 1 on every row's last token)")
    positions = positions_of(mask)
    longest = int(mask.sum(1).max())
    if longest + opts.max_new_tokens > max_positions:
        raise ValueError(f"generate: a prompt of {longest} tokens plus max_new_tokens={opts.max_new_tokens} exceeds "
                         f"the context of {max_positions} positions (max_position_embeddings in config.json)")
    logits, cache = step(None, inputs_embeds, mask, positions, None)
    position = positions[:, -1:] + 1
    b = mask.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=mask.device)
    stops = torch.tensor(opts.eos_ids or (-1,), device=mask.device)
    tokens = []
    for index in range(opts.max_new_tokens):
        token = sample_token(logits, opts.temperature, opts.top_p, generator)
        token = torch.where(done, torch.full_like(token, opts.pad_id), token)
        done = done | torch.isin(token, stops)
        tokens.append(token)
        if index + 1 == opts.max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=mask.device)], 1)
        logits, cache = step(token[:, None], None, mask, position, cache)
        position = position + 1
    out = torch.full((b, opts.max_new_tokens), opts.pad_id, dtype=torch.long, device=mask.device)
    out[:, :len(tokens)] = torch.stack(tokens, 1)
    return out


def transformers_step(language_model) -> StepFn:
    """The step of a transformers causal LM (Llama, Qwen2): its own KV cache (`past_key_values`)."""

    def step(input_ids, inputs_embeds, attention_mask, position_ids, cache):
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        out = language_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=cache, use_cache=True)
        return out.logits[:, -1], out.past_key_values

    return step
