"""Tokenizer wrappers (HF tokenizer.json and SentencePiece) and the shipped synthetic tokenizer."""
import json
import logging
import os

import pytest

from leo_jax.data import synthetic, templates
from leo_jax.data.assets import build_synthetic_tokenizer as builder
from leo_jax.data.tokenizer import SYNTHETIC_TOKENIZER_PATH, load_tokenizer
from tokenizer_helpers import LLAMA3_SPECIALS, train_byte_level_bpe, train_sentencepiece

TEXT = "What color is the circle?\n\nThe circle is red, 42 times."


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return train_byte_level_bpe(tmp_path_factory.mktemp("llama3"), LLAMA3_SPECIALS, llama3_split=True,
                                bos="<|begin_of_text|>", eos="<|end_of_text|>")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"), user_defined_symbols=["<|im_start|>", "<|im_end|>"])


def test_hf_encode_adds_no_bos_even_with_post_processor(llama3_dir):
    tok = load_tokenizer(llama3_dir)
    ids = tok.encode(TEXT)
    assert tok.bos_id == tok.token_to_id("<|begin_of_text|>")
    assert tok.eos_id == tok.token_to_id("<|end_of_text|>")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == TEXT
    assert tok.pad_id == tok.eos_id  # no pad token: falls back to EOS


def test_hf_offsets_cover_text(llama3_dir):
    tok = load_tokenizer(llama3_dir)
    ids, offsets = tok.encode_with_offsets(TEXT)
    assert len(ids) == len(offsets)
    assert "".join(TEXT[s:e] for s, e in offsets) == TEXT
    for token_id, (s, e) in zip(ids, offsets):
        assert tok.decode([token_id]) == TEXT[s:e]


def test_sentencepiece_round_trip_offsets_and_specials(sp_model):
    tok = load_tokenizer(sp_model)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    text = "<|im_start|>user\nWhat color is the circle?</s>Ünïcödé 数字"
    ids, offsets = tok.encode_with_offsets(text)
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert tok.eos_id in ids  # "</s>" in text is the EOS control token, as in HF's Llama tokenizer
    assert tok.decode(ids) == text
    assert "".join(text[s:e] for s, e in offsets) == text  # dummy-prefix pieces have zero width
    assert all(s <= e for s, e in offsets) and [s for s, _ in offsets] == sorted(s for s, _ in offsets)


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_add_special_tokens_atomic_and_logged(kind, llama3_dir, sp_model, caplog):
    tok = load_tokenizer(llama3_dir if kind == "hf" else sp_model)
    size = tok.vocab_size
    assert not tok.is_special(templates.IMG_CONTEXT)
    with caplog.at_level(logging.INFO, logger="leo_jax.data.tokenizer"):
        ids = tok.add_special_tokens(list(templates.IMAGE_TOKENS))
    assert sorted(ids.values()) == list(range(size, size + 3))  # new ids appended after the vocabulary
    assert tok.vocab_size == size + 3
    for token, token_id in ids.items():
        assert f"{token!r} -> id {token_id} (added)" in caplog.text
        assert tok.token_to_id(token) == token_id and tok.id_to_token(token_id) == token
    text = "look<img><IMG_CONTEXT></img>here"
    encoded = tok.encode(text)
    assert [i for i in encoded if i >= size] == [ids["<img>"], ids["<IMG_CONTEXT>"], ids["</img>"]]
    assert tok.decode(encoded) == text
    assert tok.decode(encoded, skip_special_tokens=True) == "lookhere"
    # Adding again changes nothing.
    assert tok.add_special_tokens(list(templates.IMAGE_TOKENS)) == ids and tok.vocab_size == size + 3


def test_add_existing_vocab_token_reuses_its_id(sp_model):
    tok = load_tokenizer(sp_model)
    assert tok.add_special_tokens(["<|im_end|>", "</s>"]) == {"<|im_end|>": tok.token_to_id("<|im_end|>"), "</s>": 2}
    assert tok.vocab_size == 420


def test_load_tokenizer_config_and_errors(tmp_path, llama3_dir):
    tok = load_tokenizer(os.path.join(llama3_dir, "tokenizer.json"), eos_token="<|eot_id|>")
    assert tok.eos_id == tok.token_to_id("<|eot_id|>")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="unknown tokenizer file type"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text(open(os.path.join(llama3_dir, "tokenizer.json")).read())
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|nope|>"}}))
    with pytest.raises(ValueError, match="eos_token '<\\|nope\\|>' is not in the vocabulary"):
        load_tokenizer(str(bad))


def test_shipped_synthetic_tokenizer_is_rebuilt_identically(tmp_path):
    rebuilt = tmp_path / "tokenizer.json"
    builder.main(["--out", str(rebuilt)])
    with open(SYNTHETIC_TOKENIZER_PATH, "rb") as f:
        assert rebuilt.read_bytes() == f.read(), "run python -m leo_jax.data.assets.build_synthetic_tokenizer"


def test_synthetic_tokenizer_covers_the_synthetic_vocabulary():
    tok = load_tokenizer(SYNTHETIC_TOKENIZER_PATH)
    assert tok.vocab_size < 1024  # small embedding table for the tiny CPU model
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for token in builder.SPECIAL_TOKENS:
        assert tok.is_special(token)
    for text in synthetic.corpus_texts():
        assert tok.decode(tok.encode(text)) == text
    for word in set(synthetic.NUMBER_WORDS) | {a for answers in synthetic.ANSWERS.values() for a in answers}:
        assert len(tok.encode(word)) == 1 and len(tok.encode(" " + word)) == 1, word
    assert len(tok.encode("What color is the triangle?")) == 6  # whole words
    assert tok.decode(tok.encode("unseen wörds still encode")) == "unseen wörds still encode"  # byte fallback
    for name in templates.TEMPLATES:
        assert templates.missing_special_tokens(tok, name) == []


def test_sentencepiece_added_tokens_from_tokenizer_config(sp_model, tmp_path):
    """A SentencePiece checkpoint dir whose tokenizer_config.json adds tokens after the model's pieces."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(open(sp_model, "rb").read())
    config = {"added_tokens_decoder": {"420": {"content": "<|action_start|>"}, "3": {"content": "<|im_start|>"},
                                       "421": {"content": "<|action_end|>"}},
              "eos_token": "<|im_end|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(directory))
    assert tok.vocab_size == 422 and tok.eos_id == tok.token_to_id("<|im_end|>")
    assert tok.encode("a<|action_end|>b<|im_start|>")[-3:] == [421, tok.encode("b")[0], 3]
    config["added_tokens_decoder"] = {"425": {"content": "<|gap|>"}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="without gaps; '<\\|gap\\|>' has id 425, expected 420"):
        load_tokenizer(str(directory))
    config["added_tokens_decoder"] = {"5": {"content": "<|im_start|>"}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="claims id 5"):
        load_tokenizer(str(directory))
