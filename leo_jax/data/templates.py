"""Conversation templates: LLaVA-style conversations -> token ids, loss mask and prompt mask.

A conversation is rendered to one string (as chat templates do), tokenized once, and each token is
labelled by the character span it covers: tokens of an assistant answer and of the terminator that
ends it are supervised (`loss_mask`), tokens of user text are the prompt (`prompt_mask`, the text
LEO-MINI's CoTR and router condition on). Inference (`add_generation_prompt=True`) renders the
conversation with a stand-in answer and keeps the tokens before the first answer token, so training
and generation see identical prompt tokens even where a tokenizer merges the header's trailing
whitespace differently at the end of a string (byte-level BPE: "\n\n" alone is one token, "\n\nred"
is "\n", "\n", "red").

Each `<image>` in a user turn becomes IMG_START + n * IMG_CONTEXT + IMG_END, n taken in order from
`image_token_counts` (LEO: 512 per tile; LEO-MINI: the CoTR query count, e.g. 64).

Templates: 'leo_internlm2_chat' (LEO: the official LEO code's 'internlm2-chat' conversation, MPT separators: fixed
system message, no newline after <|im_end|>, every message stripped), 'internlm2_chat' (generic ChatML, as
InternLM2 / InternVL: a newline after each <|im_end|>, no default system message), 'llama3' (LEO-MINI-Llama3),
'vicuna_v1' (LLaVA-1.5 / LEO-MINI-Vicuna), 'plain' (projector pretraining: image tokens, caption, EOS; user text
dropped). `chat_template_jinja` writes any of them as a Hugging Face Jinja chat template.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from leo_jax.data.tokenizer import Tokenizer, load_tokenizer

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IMAGE_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT)
IMAGE_PLACEHOLDER = "<image>"
EOS = "{eos}"  # in a template field: the tokenizer's EOS token
# Stands in for the answer when rendering a generation prompt (cut off again before its first token): a
# word, as answers usually start, so the header's last tokens come out as they did before answers in training.
GENERATION_PROBE = "Answer"

INTERNVL_SYSTEM_PROMPT = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                          "是一个有用无害的人工智能助手。")
LEO_SYSTEM_PROMPT = ("You are LEO, a multimodal large language model developed by Waterloo WISE lab. You are a "
                     "helpful and harmless AI assistant")
VICUNA_SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                        "The assistant gives helpful, detailed, and polite answers to the user's questions.")

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
SYSTEM_ROLES = ("system",)


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
    """How one chat format lays out a conversation.

    Rendered text: prefix, system block (if any), then per exchange
    user.format(content) + assistant_header + answer_separator + answer + answer_end + after_answer.
    Supervised: answer_separator, answer and answer_end. A generation prompt ends where the answer's
    first token would start (after assistant_header; see encode_conversation). `strip`: every message (and the
    system prompt) is stripped of surrounding whitespace first, as LEO's training code does. `upstream_name`: the
    name of this exact format in the official LEO code (its config.json `template`), None if it has none.
    """

    name: str
    add_bos: bool  # prepend the tokenizer's BOS id (when it has one)
    prefix: str
    system: str  # '{content}' is the system prompt; used only when there is one
    default_system_prompt: str | None
    user: str
    assistant_header: str
    answer_separator: str
    answer_end: str
    after_answer: str
    special_tokens: tuple[str, ...]  # template tokens the tokenizer must treat atomically
    multi_turn: bool = True
    keep_user_text: bool = True
    strip: bool = False
    upstream_name: str | None = None


TEMPLATES = {
    t.name: t
    for t in (
        ConversationTemplate(
            name="leo_internlm2_chat", add_bos=True, prefix="",
            system="<|im_start|>system\n{content}<|im_end|>", default_system_prompt=LEO_SYSTEM_PROMPT,
            user="<|im_start|>user\n{content}<|im_end|>", assistant_header="<|im_start|>assistant\n",
            answer_separator="", answer_end="<|im_end|>", after_answer="",
            special_tokens=("<|im_start|>", "<|im_end|>"), strip=True, upstream_name="internlm2-chat"),
        ConversationTemplate(
            name="internlm2_chat", add_bos=True, prefix="",
            system="<|im_start|>system\n{content}<|im_end|>\n", default_system_prompt=None,
            user="<|im_start|>user\n{content}<|im_end|>\n", assistant_header="<|im_start|>assistant\n",
            answer_separator="", answer_end="<|im_end|>", after_answer="\n",
            special_tokens=("<|im_start|>", "<|im_end|>")),
        ConversationTemplate(
            name="llama3", add_bos=False, prefix="<|begin_of_text|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>", default_system_prompt=None,
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
            answer_separator="", answer_end="<|eot_id|>", after_answer="",
            special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
        ConversationTemplate(
            name="vicuna_v1", add_bos=True, prefix="",
            system="{content} ", default_system_prompt=VICUNA_SYSTEM_PROMPT,
            user="USER: {content}", assistant_header=" ASSISTANT:",
            answer_separator=" ", answer_end=EOS, after_answer="",
            special_tokens=(EOS,)),
        ConversationTemplate(
            name="plain", add_bos=True, prefix="", system="", default_system_prompt=None,
            user="{content}", assistant_header="", answer_separator="", answer_end=EOS, after_answer="",
            special_tokens=(EOS,), multi_turn=False, keep_user_text=False),
    )
}


@dataclasses.dataclass
class EncodedConversation:
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]: assistant answer tokens and the terminator ending each answer
    prompt_mask: np.ndarray  # bool [T]: user text tokens (no image or template tokens)
    num_images: int


def get_template(template: str | ConversationTemplate) -> ConversationTemplate:
    if isinstance(template, ConversationTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def _eos_token(tokenizer: Tokenizer, template: ConversationTemplate) -> str:
    if tokenizer.eos_id is None:
        raise ValueError(f"template {template.name!r} ends answers with EOS but tokenizer {tokenizer.name} has no "
                         "EOS token; pass eos_token=... to load_tokenizer")
    return tokenizer.id_to_token(tokenizer.eos_id)


def required_special_tokens(tokenizer: Tokenizer, template: str | ConversationTemplate,
                            with_images: bool = True) -> list[str]:
    """Tokens that must be atomic in `tokenizer` for `template` (and for images when with_images)."""
    template = get_template(template)
    tokens = [_eos_token(tokenizer, template) if t == EOS else t for t in template.special_tokens]
    return tokens + (list(IMAGE_TOKENS) if with_images else [])


def missing_special_tokens(tokenizer: Tokenizer, template: str | ConversationTemplate,
                           with_images: bool = True) -> list[str]:
    """Required tokens that `tokenizer` would split into pieces (or lacks)."""
    return [t for t in required_special_tokens(tokenizer, template, with_images) if not tokenizer.is_special(t)]


def missing_tokens_message(missing: Sequence[str], tokenizer: Tokenizer, template: ConversationTemplate) -> str:
    return (f"tokenizer {tokenizer.name} lacks special token(s) {list(missing)} needed by template "
            f"{template.name!r}: use the tokenizer that matches the checkpoint, or call "
            f"setup_tokenizer(..., add_missing_template_tokens=True) / tokenizer.add_special_tokens(...) and give "
            f"the model an embedding table of at least tokenizer.vocab_size rows")


def setup_tokenizer(tokenizer: Tokenizer | str, template: str | ConversationTemplate, *,
                    add_missing_template_tokens: bool = False) -> Tokenizer:
    """Loads (if a path) and prepares a tokenizer for `template`: adds the image tokens (ids logged) and
    checks the template's tokens, adding them too only when asked (their embeddings start untrained)."""
    template = get_template(template)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    tokenizer.add_special_tokens(list(IMAGE_TOKENS))
    missing = missing_special_tokens(tokenizer, template, with_images=False)
    if missing and not add_missing_template_tokens:
        raise ValueError(missing_tokens_message(missing, tokenizer, template))
    tokenizer.add_special_tokens(required_special_tokens(tokenizer, template, with_images=False))
    return tokenizer


def _answer_end_token(tokenizer: Tokenizer, template: ConversationTemplate) -> str:
    return _eos_token(tokenizer, template) if template.answer_end == EOS else template.answer_end


def stop_token_ids(tokenizer: Tokenizer, template: str | ConversationTemplate) -> list[int]:
    """Ids that end generation: the template's answer terminator, plus EOS."""
    template = get_template(template)
    ids = [tokenizer.token_to_id(_answer_end_token(tokenizer, template))]
    if tokenizer.eos_id is not None and tokenizer.eos_id not in ids:
        ids.append(tokenizer.eos_id)
    return ids


def _normalise_turns(conversations, template: ConversationTemplate, add_generation_prompt: bool):
    """Validates roles and order; returns (system_prompt or None, [(user, assistant or None), ...])."""
    if not conversations:
        raise ValueError("empty conversation: 'conversations' must hold at least one human turn")
    turns = list(conversations)
    system = None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversation turn {i} must be a dict with 'from' and 'value', got {turn!r}")
        if not isinstance(turn["value"], str):
            raise ValueError(f"conversation turn {i}: 'value' must be a string, got {type(turn['value']).__name__}")
    if turns[0]["from"] in SYSTEM_ROLES:
        system = turns.pop(0)["value"]
    exchanges = []
    for i, turn in enumerate(turns):
        expected = USER_ROLES if i % 2 == 0 else ASSISTANT_ROLES
        if turn["from"] not in expected:
            raise ValueError(f"conversation turn {i + (system is not None)} has 'from'={turn['from']!r}; turns must "
                             f"alternate human/gpt starting with human (optionally after one system turn)")
        if i % 2 == 0:
            exchanges.append([turn["value"], None])
        else:
            exchanges[-1][1] = turn["value"]
    if add_generation_prompt and exchanges[-1][1] is not None:
        raise ValueError("add_generation_prompt=True needs a conversation that ends with a human turn")
    if not template.multi_turn and len(exchanges) > 1:
        raise ValueError(f"template {template.name!r} takes one human/gpt exchange, got {len(exchanges)}")
    for user, answer in exchanges:
        if answer is not None and IMAGE_PLACEHOLDER in answer:
            raise ValueError(f"an assistant turn contains {IMAGE_PLACEHOLDER!r}; images belong in human turns")
    if system is not None and IMAGE_PLACEHOLDER in system:
        raise ValueError(f"the system turn contains {IMAGE_PLACEHOLDER!r}; images belong in human turns")
    return system, exchanges


def _render(template, tokenizer, system_prompt, exchanges):
    """Returns (text, user_spans, answer_spans): character spans of user content and supervised text."""
    pieces: list[tuple[str, str]] = [(template.prefix, "template")]
    if template.strip:
        system_prompt = system_prompt.strip() if system_prompt else system_prompt
        exchanges = [(user.strip(), None if answer is None else answer.strip()) for user, answer in exchanges]
    if system_prompt and template.system:
        before, after = template.system.split("{content}")
        pieces += [(before, "template"), (system_prompt, "template"), (after, "template")]
    answer_end = _answer_end_token(tokenizer, template)
    for user, answer in exchanges:
        if not template.keep_user_text:
            user = IMAGE_PLACEHOLDER * user.count(IMAGE_PLACEHOLDER)
        before, after = template.user.split("{content}")
        pieces += [(before, "template"), (user, "user"), (after, "template")]
        if answer is not None:
            # The separator is supervised with the answer: a tokenizer may emit it as its own token
            # (SentencePiece's lone "▁"), which generation, starting after the header, must produce.
            pieces += [(template.assistant_header, "template"), (template.answer_separator, "answer"),
                       (answer, "answer"), (answer_end, "answer"), (template.after_answer, "template")]

    image_tags = IMG_START + IMG_CONTEXT + IMG_END
    text_parts, user_spans, answer_spans, pos = [], [], [], 0
    for piece, kind in pieces:
        if kind == "user":
            piece = piece.replace(IMAGE_PLACEHOLDER, image_tags)
        text_parts.append(piece)
        if kind == "user":
            user_spans.append((pos, pos + len(piece)))
        elif kind == "answer":
            answer_spans.append((pos, pos + len(piece)))
        pos += len(piece)
    return "".join(text_parts), user_spans, answer_spans


def _tokens_in_spans(offsets: np.ndarray, spans, text_len: int) -> np.ndarray:
    """Per token: does its character range [start, end) overlap any span? (Zero-width tokens, such as
    SentencePiece's dummy prefix, count as covering the character they sit before.)"""
    inside = np.zeros(text_len + 1, np.int64)
    for start, end in spans:
        inside[start:end] = 1
    cumulative = np.concatenate([[0], np.cumsum(inside)])
    starts = offsets[:, 0]
    ends = np.maximum(offsets[:, 1], starts + 1)
    return cumulative[ends] - cumulative[starts] > 0


def encode_conversation(conversations: Sequence[dict], tokenizer: Tokenizer, template: str | ConversationTemplate,
                        image_token_counts: Sequence[int], *, system_prompt: str | None = None,
                        add_generation_prompt: bool = False) -> EncodedConversation:
    """Tokenizes a LLaVA conversation ([{'from': 'human'|'gpt'|'system', 'value': str}, ...]).

    image_token_counts: visual tokens of each `<image>`, in order of appearance (one entry per image).
    system_prompt: None -> a leading 'system' turn, else the template's default; '' -> no system block.
    add_generation_prompt: end where the assistant's answer starts (the conversation must end with a
    human turn): the tokens before the first answer token, as in the training encoding.
    Raises ValueError naming the problem for malformed conversations, placeholder/image count
    mismatches, and template or image tokens the tokenizer lacks.
    """
    template = get_template(template)
    system_turn, exchanges = _normalise_turns(conversations, template, add_generation_prompt)
    if system_prompt is None:
        system_prompt = system_turn if system_turn is not None else template.default_system_prompt

    all_text = "".join(t["value"] for t in conversations) + (system_prompt or "")
    for reserved in IMAGE_TOKENS:
        if reserved in all_text:
            raise ValueError(f"conversation text contains the reserved token {reserved!r}; write images as "
                             f"{IMAGE_PLACEHOLDER!r} and remove literal image tokens from the data")
    # Template control tokens typed in the text would become real structure (a turn end, a header): rejected, so
    # the training pipeline counts such a sample as a skip ('bad_conversation') and chat reports it.
    control = [t for t in template.special_tokens if t != EOS]
    if EOS in template.special_tokens and tokenizer.eos_id is not None:
        control.append(tokenizer.id_to_token(tokenizer.eos_id))
    for reserved in control:
        if reserved in all_text:
            raise ValueError(f"conversation text contains {reserved!r}, a control token of template "
                             f"{template.name!r}; typed in a message it would end or open a turn. Remove it from "
                             "the text")
    num_images = sum(user.count(IMAGE_PLACEHOLDER) for user, _ in exchanges)
    counts = [int(n) for n in image_token_counts]
    if num_images != len(counts):
        raise ValueError(f"conversation has {num_images} {IMAGE_PLACEHOLDER!r} placeholder(s) but "
                         f"{len(counts)} image(s) were given; each image needs exactly one {IMAGE_PLACEHOLDER!r} "
                         f"in a human turn (fix the sample's 'image' field or its placeholders)")
    if any(n < 1 for n in counts):
        raise ValueError(f"image_token_counts must be >= 1 per image, got {counts}")
    missing = missing_special_tokens(tokenizer, template, with_images=num_images > 0)
    if missing:
        raise ValueError(missing_tokens_message(missing, tokenizer, template))

    if add_generation_prompt:
        exchanges[-1][1] = GENERATION_PROBE
    text, user_spans, answer_spans = _render(template, tokenizer, system_prompt, exchanges)
    ids, offsets = tokenizer.encode_with_offsets(text)
    ids = np.asarray(ids, np.int32)
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    loss_mask = _tokens_in_spans(offsets, answer_spans, len(text))
    if add_generation_prompt:  # keep what precedes the stand-in answer's first token
        probe_start = answer_spans[-3][0]  # the last exchange's spans: separator, answer, terminator
        cut = int(np.argmax(_tokens_in_spans(offsets, [(probe_start, len(text))], len(text))))
        ids, offsets, loss_mask = ids[:cut], offsets[:cut], loss_mask[:cut]
    image_ids = [i for i in map(tokenizer.token_to_id, IMAGE_TOKENS) if i is not None]
    prompt_mask = _tokens_in_spans(offsets, user_spans, len(text)) & ~loss_mask & ~np.isin(ids, image_ids)

    # One IMG_CONTEXT was rendered per image; repeat each to that image's token count.
    context_positions = np.flatnonzero(ids == tokenizer.token_to_id(IMG_CONTEXT)) if num_images else []
    if len(context_positions) != num_images:
        raise ValueError(f"tokenizer {tokenizer.name} produced {len(context_positions)} {IMG_CONTEXT} tokens for "
                         f"{num_images} images; the tokenizer must treat image tokens atomically")
    repeats = np.ones(len(ids), np.int64)
    repeats[context_positions] = counts
    if template.add_bos and tokenizer.bos_id is not None:
        ids = np.concatenate([[tokenizer.bos_id], ids]).astype(np.int32)
        loss_mask = np.concatenate([[False], loss_mask])
        prompt_mask = np.concatenate([[False], prompt_mask])
        repeats = np.concatenate([[1], repeats])
    return EncodedConversation(input_ids=np.repeat(ids, repeats).astype(np.int32),
                               loss_mask=np.repeat(loss_mask, repeats),
                               prompt_mask=np.repeat(prompt_mask, repeats), num_images=num_images)


def ensure_image_placeholders(conversations: Sequence[dict], num_images: int) -> list[dict]:
    """For samples with images but no `<image>` tag: prepend `<image>\\n` per image to the first human
    turn (as LLaVA/InternVL do). Samples that already have tags are returned unchanged."""
    conversations = [dict(t) for t in conversations]
    if num_images and not any(IMAGE_PLACEHOLDER in t["value"] for t in conversations):
        for turn in conversations:
            if turn["from"] in USER_ROLES:
                turn["value"] = (IMAGE_PLACEHOLDER + "\n") * num_images + turn["value"]
                break
    return conversations


def chat_template_jinja(template: str | ConversationTemplate) -> str:
    """`template` as a Hugging Face chat template (tokenizer_config.json `chat_template`): messages with roles
    'system' (optional, first), 'user', 'assistant'; '<image>' stays in the text for the caller to expand, as the
    official LEO `chat()` does. It renders the text `encode_conversation` tokenizes, BOS included (HF's
    `apply_chat_template` tokenizes without adding special tokens), and `add_generation_prompt` ends after the
    assistant header."""
    template = get_template(template)

    def text(s: str) -> str:  # a Jinja string literal (JSON escapes are Jinja's unicode-escape escapes)
        parts = [json.dumps(part) if part != EOS else "eos_token" for part in _split_eos(s)]
        return "{{ " + " ~ ".join(parts) + " }}" if parts else ""

    def content(expr: str) -> str:
        return "{{ " + expr + (" | trim" if template.strip else "") + " }}"

    user_before, user_after = template.user.split("{content}")
    system = ""
    if template.system:
        system_before, system_after = template.system.split("{content}")
        system = "{% if system %}" + text(system_before) + content("system") + text(system_after) + "{% endif %}"
    user_text = content("message['content']") if template.keep_user_text else \
        "{{ '<image>' * message['content'].count('<image>') }}"
    default = json.dumps(template.default_system_prompt or "")
    return ("{% set system = " + default + " %}{% set turns = messages %}"
            "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% set turns = messages[1:] %}{% endif %}"
            + ("{{ bos_token }}" if template.add_bos else "") + text(template.prefix) + system
            + "{% for message in turns %}{% if message['role'] == 'user' %}" + text(user_before) + user_text
            + text(user_after) + "{% elif message['role'] == 'assistant' %}" + text(template.assistant_header)
            + text(template.answer_separator) + content("message['content']") + text(template.answer_end)
            + text(template.after_answer) + "{% else %}{{ raise_exception('chat template " + template.name
            + ": roles are system (first), user and assistant') }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + text(template.assistant_header) + "{% endif %}")


def _split_eos(s: str) -> list[str]:
    """`s` cut around the EOS placeholder, which is kept as its own part."""
    parts = s.split(EOS)
    out = []
    for i, part in enumerate(parts):
        if i:
            out.append(EOS)
        if part:
            out.append(part)
    return out


def decode_answer(tokenizer: Tokenizer, tokens: Sequence[int], stop_ids: Sequence[int]) -> str:
    """The text of generated tokens up to the first stop id, special tokens dropped, stripped."""
    out = []
    for token in np.asarray(tokens).tolist():
        if token in stop_ids:
            break
        out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True).strip()
