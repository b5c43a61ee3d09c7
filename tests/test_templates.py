"""Conversation templates on real-like tokenizers: exactly the assistant answers (+ terminator) are
supervised, user text is the prompt, images expand in place, generation prompts are training prefixes."""
import numpy as np
import pytest

from leo_jax.data import templates
from leo_jax.data.templates import IMG_CONTEXT, IMG_END, IMG_START, encode_conversation
from leo_jax.data.tokenizer import HFTokenizer, load_tokenizer
from tokenizer_helpers import CHATML_SPECIALS, LLAMA3_SPECIALS, train_byte_level_bpe, train_sentencepiece

CONVERSATION = [
    {"from": "human", "value": "<image>\n<image>\nWhat color is the circle in the first image?"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "And how many squares are there?"},
    {"from": "gpt", "value": "two"},
    {"from": "human", "value": "Compare <image> with them."},
    {"from": "gpt", "value": "It has more objects, 42 in total!"},
]
IMAGE_COUNTS = [3, 5, 2]
TERMINATORS = {"internlm2_chat": "<|im_end|>", "llama3": "<|eot_id|>", "vicuna_v1": "</s>", "plain": "</s>"}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Family-like tokenizers with the image tokens added (as the pipeline does via setup_tokenizer)."""
    root = tmp_path_factory.mktemp("tok")
    paths = {
        "chatml_bpe": train_byte_level_bpe(root / "qwen", CHATML_SPECIALS + ["<s>", "</s>"], eos="</s>"),
        "llama3_bpe": train_byte_level_bpe(root / "llama3", LLAMA3_SPECIALS + ["</s>"], llama3_split=True,
                                           bos="<|begin_of_text|>", eos="<|end_of_text|>"),
        "chatml_sp": train_sentencepiece(root / "internlm2", user_defined_symbols=["<|im_start|>", "<|im_end|>"]),
        "llama2_sp": train_sentencepiece(root / "llama2"),
    }
    loaded = {name: load_tokenizer(path) for name, path in paths.items()}
    for tok in loaded.values():
        tok.add_special_tokens(list(templates.IMAGE_TOKENS))
    return loaded


def runs(mask):
    """[start, end) of each maximal True run."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[0::2], edges[1::2]))


CASES = [("internlm2_chat", "chatml_bpe"), ("internlm2_chat", "chatml_sp"), ("llama3", "llama3_bpe"),
         ("vicuna_v1", "llama2_sp"), ("vicuna_v1", "chatml_bpe")]


@pytest.mark.parametrize("template,tok_name", CASES)
def test_only_answers_and_terminators_are_supervised(template, tok_name, tokenizers):
    tok = tokenizers[tok_name]
    enc = encode_conversation(CONVERSATION, tok, template, IMAGE_COUNTS)
    ids = enc.input_ids
    assert ids.dtype == np.int32 and enc.loss_mask.dtype == np.bool_ and enc.prompt_mask.dtype == np.bool_
    assert enc.num_images == 3
    # Each supervised run decodes to exactly one answer + the turn terminator. (Vicuna puts a space
    # between "ASSISTANT:" and the answer; the answer's first token carries it, as in LLaVA.)
    supervised = [tok.decode(ids[s:e]) for s, e in runs(enc.loss_mask)]
    prefix = " " if template == "vicuna_v1" and isinstance(tok, HFTokenizer) else ""
    assert supervised == [prefix + t["value"] + TERMINATORS[template] for t in CONVERSATION[1::2]]
    # User text is the prompt, never supervised; no template or image token is in either mask.
    assert not np.any(enc.loss_mask & enc.prompt_mask)
    prompt_text = tok.decode(ids[enc.prompt_mask])
    user_text = "".join(t["value"].replace("<image>", "") for t in CONVERSATION[0::2])
    assert "".join(prompt_text.split()) == "".join(user_text.split())  # SentencePiece drops some spaces
    image_ids = [tok.token_to_id(t) for t in templates.IMAGE_TOKENS]
    assert not np.any(np.isin(ids, image_ids) & (enc.loss_mask | enc.prompt_mask))
    for special in templates.required_special_tokens(tok, template, with_images=False):
        assert not np.any((ids == tok.token_to_id(special)) & enc.prompt_mask)
    # Images expand in order, each IMG_START + n x IMG_CONTEXT + IMG_END.
    context_runs = runs(ids == tok.token_to_id(IMG_CONTEXT))
    assert [e - s for s, e in context_runs] == IMAGE_COUNTS
    for s, e in context_runs:
        assert ids[s - 1] == tok.token_to_id(IMG_START) and ids[e] == tok.token_to_id(IMG_END)
    # BOS once at the start.
    bos = tok.token_to_id("<|begin_of_text|>") if template == "llama3" else tok.bos_id
    assert ids[0] == bos and np.sum(ids == bos) == 1


@pytest.mark.parametrize("template,tok_name", CASES)
def test_generation_prompt_is_a_prefix_of_training_ids(template, tok_name, tokenizers):
    tok = tokenizers[tok_name]
    full = encode_conversation(CONVERSATION, tok, template, IMAGE_COUNTS)
    for turns in (1, 3, 5):
        images = IMAGE_COUNTS[:sum(t["value"].count("<image>") for t in CONVERSATION[:turns])]
        prompt = encode_conversation(CONVERSATION[:turns], tok, template, images, add_generation_prompt=True)
        n = len(prompt.input_ids)
        np.testing.assert_array_equal(prompt.input_ids, full.input_ids[:n])
        np.testing.assert_array_equal(prompt.prompt_mask, full.prompt_mask[:n])
        np.testing.assert_array_equal(prompt.loss_mask, full.loss_mask[:n])
        assert not prompt.loss_mask[-1]
        assert full.loss_mask[n]  # the next token is the first answer token


def test_internlm2_chat_exact_layout_with_system_prompt(tokenizers):
    tok = tokenizers["chatml_bpe"]
    conversation = [{"from": "human", "value": "<image>\nHi?"}, {"from": "gpt", "value": "red"}]
    enc = encode_conversation(conversation, tok, "internlm2_chat", [2], system_prompt="Be brief.")
    assert tok.decode(enc.input_ids) == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nHi?"
        "<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n")
    assert tok.decode(enc.input_ids[enc.loss_mask]) == "red<|im_end|>"
    assert tok.decode(enc.input_ids[enc.prompt_mask]) == "\nHi?"
    # A leading system turn is used the same way; the InternVL prompt is available as a constant.
    with_turn = encode_conversation([{"from": "system", "value": "Be brief."}] + conversation, tok,
                                    "internlm2_chat", [2])
    np.testing.assert_array_equal(with_turn.input_ids, enc.input_ids)
    internvl = encode_conversation(conversation, tok, "internlm2_chat", [2],
                                   system_prompt=templates.INTERNVL_SYSTEM_PROMPT)
    assert templates.INTERNVL_SYSTEM_PROMPT in tok.decode(internvl.input_ids)
    np.testing.assert_array_equal(internvl.input_ids[internvl.loss_mask], enc.input_ids[enc.loss_mask])


def test_llama3_and_vicuna_exact_layout(tokenizers):
    conversation = [{"from": "human", "value": "<image>\nHi?"}, {"from": "gpt", "value": "red"}]
    tok = tokenizers["llama3_bpe"]
    enc = encode_conversation(conversation, tok, "llama3", [1])
    assert tok.decode(enc.input_ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<img><IMG_CONTEXT></img>\nHi?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>")
    assert templates.stop_token_ids(tok, "llama3") == [tok.token_to_id("<|eot_id|>"), tok.eos_id]
    tok = tokenizers["chatml_bpe"]
    enc = encode_conversation(conversation, tok, "vicuna_v1", [1])
    assert tok.decode(enc.input_ids) == (
        "<s>" + templates.VICUNA_SYSTEM_PROMPT + " USER: <img><IMG_CONTEXT></img>\nHi? ASSISTANT: red</s>")


@pytest.mark.parametrize("tok_name", ["llama2_sp", "chatml_bpe"])
def test_plain_template_supervises_caption_and_eos_only(tok_name, tokenizers):
    tok = tokenizers[tok_name]
    conversation = [{"from": "human", "value": "Describe the picture.\n<image>"},
                    {"from": "gpt", "value": "A photo of a cat."}]
    enc = encode_conversation(conversation, tok, "plain", [4])
    ids = enc.input_ids
    assert ids[0] == tok.bos_id and ids[1] == tok.token_to_id(IMG_START)
    assert np.sum(ids == tok.token_to_id(IMG_CONTEXT)) == 4
    assert tok.decode(ids[enc.loss_mask]) == "A photo of a cat.</s>"
    assert "Describe" not in tok.decode(ids) and not enc.prompt_mask.any()
    with pytest.raises(ValueError, match="takes one human/gpt exchange"):
        encode_conversation(CONVERSATION, tok, "plain", IMAGE_COUNTS)


def test_text_only_conversation_needs_no_image_tokens(tmp_path):
    tok = load_tokenizer(train_byte_level_bpe(tmp_path, CHATML_SPECIALS + ["<s>", "</s>"], eos="</s>"))
    enc = encode_conversation([{"from": "user", "value": "What is two plus two?"},
                               {"from": "assistant", "value": "four"}], tok, "internlm2_chat", [])
    assert enc.num_images == 0 and tok.decode(enc.input_ids[enc.loss_mask]) == "four<|im_end|>"
    assert tok.decode(enc.input_ids[enc.prompt_mask]) == "What is two plus two?"


@pytest.mark.parametrize("conversation,counts,message", [
    (CONVERSATION, [3, 5], "3 '<image>' placeholder\\(s\\) but 2 image\\(s\\)"),
    ([{"from": "human", "value": "No tag here"}, {"from": "gpt", "value": "x"}], [4], "0 '<image>'"),
    ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image> x"}], [1], "assistant turn contains"),
    ([{"from": "human", "value": "a <IMG_CONTEXT> b"}, {"from": "gpt", "value": "x"}], [], "reserved token"),
    ([{"from": "gpt", "value": "x"}], [], "alternate human/gpt"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], [], "turn 1 has 'from'='human'"),
    ([{"from": "human"}], [], "must be a dict with 'from' and 'value'"),
    ([], [], "empty conversation"),
    ([{"from": "human", "value": "<image>"}], [0], ">= 1 per image"),
])
def test_malformed_conversations_raise_clear_errors(conversation, counts, message, tokenizers):
    with pytest.raises(ValueError, match=message):
        encode_conversation(conversation, tokenizers["chatml_bpe"], "internlm2_chat", counts)


def test_generation_prompt_needs_a_final_human_turn(tokenizers):
    with pytest.raises(ValueError, match="ends with a human turn"):
        encode_conversation(CONVERSATION[:2], tokenizers["chatml_bpe"], "internlm2_chat", [3, 5],
                            add_generation_prompt=True)


def test_missing_template_tokens_are_reported_and_can_be_added(tokenizers, tmp_path):
    tok = tokenizers["llama2_sp"]  # has no ChatML or Llama 3 tokens
    with pytest.raises(ValueError, match="lacks special token\\(s\\) \\['<\\|begin_of_text\\|>'"):
        encode_conversation(CONVERSATION[:2], tok, "llama3", [3, 5])
    with pytest.raises(ValueError, match="unknown conversation template 'chatml'"):
        encode_conversation(CONVERSATION[:2], tok, "chatml", [3, 5])
    fresh = load_tokenizer(train_sentencepiece(tmp_path))
    with pytest.raises(ValueError, match="<\\|im_start\\|>"):
        templates.setup_tokenizer(fresh, "internlm2_chat")
    assert fresh.is_special(IMG_CONTEXT)  # image tokens are always added
    templates.setup_tokenizer(fresh, "internlm2_chat", add_missing_template_tokens=True)
    enc = encode_conversation(CONVERSATION[:2], fresh, "internlm2_chat", [3, 5])
    assert fresh.decode(enc.input_ids[enc.loss_mask]) == "The circle is red.<|im_end|>"


def test_ensure_image_placeholders():
    conversation = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "x"}]
    fixed = templates.ensure_image_placeholders(conversation, 2)
    assert fixed[0]["value"] == "<image>\n<image>\nWhat is it?" and conversation[0]["value"] == "What is it?"
    assert templates.ensure_image_placeholders(CONVERSATION, 3) == CONVERSATION


# The official LEO code's 'internlm2-chat' conversation (MPT separators) rendered by hand: the fixed system message,
# no newline after <|im_end|>, every message stripped.
LEO_SYSTEM = ("<|im_start|>system\nYou are LEO, a multimodal large language model developed by Waterloo WISE lab. "
              "You are a helpful and harmless AI assistant<|im_end|>")
LEO_CASES = {
    "one image, two turns (generation prompt)": (
        [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"},
         {"from": "human", "value": "Shape?"}], [4], True,
        LEO_SYSTEM + "<|im_start|>user\n<image>\nWhat color?<|im_end|><|im_start|>assistant\nred<|im_end|>"
        "<|im_start|>user\nShape?<|im_end|><|im_start|>assistant\n"),
    "single turn, whitespace stripped": (
        [{"from": "human", "value": "  <image>\nIs there a red circle?\n"}, {"from": "gpt", "value": " yes \n"}],
        [3], False,
        LEO_SYSTEM + "<|im_start|>user\n<image>\nIs there a red circle?<|im_end|><|im_start|>assistant\nyes"
        "<|im_end|>"),
    "multi-turn": (
        [{"from": "human", "value": "<image>\nWhat shape is it?"}, {"from": "gpt", "value": "circle"},
         {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two"},
         {"from": "human", "value": "Left or right?"}, {"from": "gpt", "value": "left"}], [2], False,
        LEO_SYSTEM + "<|im_start|>user\n<image>\nWhat shape is it?<|im_end|><|im_start|>assistant\ncircle<|im_end|>"
        "<|im_start|>user\nHow many?<|im_end|><|im_start|>assistant\ntwo<|im_end|><|im_start|>user\nLeft or right?"
        "<|im_end|><|im_start|>assistant\nleft<|im_end|>"),
    "text only": (
        [{"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": "red circle top left"}], [],
        False,
        LEO_SYSTEM + "<|im_start|>user\nDescribe the image.<|im_end|><|im_start|>assistant\nred circle top left"
        "<|im_end|>"),
    "two images": (
        [{"from": "human", "value": "<image>\n<image>\nWhich has more circles?"}, {"from": "gpt", "value": "first"}],
        [3, 5], False,
        LEO_SYSTEM + "<|im_start|>user\n<image>\n<image>\nWhich has more circles?<|im_end|><|im_start|>assistant\n"
        "first<|im_end|>"),
}


@pytest.mark.parametrize("case", sorted(LEO_CASES))
def test_leo_template_is_the_official_leo_conversation_token_by_token(case):
    """Ids = the synthetic tokenizer on the official rendering (each <image> -> <img> + n <IMG_CONTEXT> + </img>, BOS
    first, as the official tokenizer adds it); supervised = each answer and its <|im_end|>, nothing else."""
    from leo_jax.data.tokenizer import SYNTHETIC_TOKENIZER_PATH

    conversation, counts, generation, rendered = LEO_CASES[case]
    tok = templates.setup_tokenizer(SYNTHETIC_TOKENIZER_PATH, "leo_internlm2_chat")
    for n in counts:
        rendered = rendered.replace("<image>", IMG_START + IMG_CONTEXT * n + IMG_END, 1)
    expected = [tok.bos_id] + tok.encode(rendered)
    enc = encode_conversation(conversation, tok, "leo_internlm2_chat", counts, add_generation_prompt=generation)
    assert enc.input_ids.tolist() == expected
    answers = [t["value"].strip() + "<|im_end|>" for t in conversation[1::2]]
    assert [tok.decode(enc.input_ids[s:e]) for s, e in runs(enc.loss_mask)] == answers
    assert int(enc.loss_mask.sum()) == sum(len(tok.encode(a)) for a in answers)


@pytest.mark.parametrize("template", sorted(set(templates.TEMPLATES) - {"plain"}))
def test_jinja_chat_template_renders_what_encode_conversation_tokenizes(template):
    """transformers' apply_chat_template with chat_template_jinja on a multi-turn conversation with two images
    (<image> expanded afterwards, as the official chat() does): the same ids for the whole conversation, and for
    a generation prompt the same text (byte-level BPE merges a trailing header differently at the end of a string,
    which encode_conversation avoids on purpose)."""
    from transformers import PreTrainedTokenizerFast

    from leo_jax.data.tokenizer import SYNTHETIC_TOKENIZER_PATH

    conversation = [{"from": "human", "value": " <image>\nWhat color is it? "}, {"from": "gpt", "value": "red "},
                    {"from": "human", "value": "And this one?\n<image>"}, {"from": "gpt", "value": "blue"}]
    tok = templates.setup_tokenizer(SYNTHETIC_TOKENIZER_PATH, template)
    hf = PreTrainedTokenizerFast(tokenizer_file=SYNTHETIC_TOKENIZER_PATH, bos_token="<s>", eos_token="</s>",
                                 chat_template=templates.chat_template_jinja(template))
    roles = {"human": "user", "gpt": "assistant"}
    for turns, generation in ((conversation, False), (conversation[:3], True)):
        ours = encode_conversation(turns, tok, template, [1, 1], add_generation_prompt=generation)
        text = hf.apply_chat_template([{"role": roles[t["from"]], "content": t["value"]} for t in turns],
                                      tokenize=False, add_generation_prompt=generation)
        text = text.replace("<image>", IMG_START + IMG_CONTEXT + IMG_END)
        if generation:
            assert text == tok.decode(ours.input_ids)
        else:
            assert hf(text, add_special_tokens=False).input_ids == ours.input_ids.tolist()
