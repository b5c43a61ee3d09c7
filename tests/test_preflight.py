"""Pre-flight batch checks: each failure mode raises a ValueError that names it."""
import logging

import numpy as np
import pytest

from leo_jax.data import preflight, templates
from leo_jax.data.tokenizer import SYNTHETIC_TOKENIZER_PATH, load_tokenizer
from tokenizer_helpers import train_sentencepiece

TOKENS_PER_TILE = 4
SEQ_LEN = 64
QA = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}]
TEXT_QA = [{"from": "human", "value": "What is one plus two?"}, {"from": "gpt", "value": "three"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SYNTHETIC_TOKENIZER_PATH)


def collate(tok, samples, max_tiles=3):
    """A contract-shaped LEO batch from (conversation, tiles per image) pairs, one sample per row."""
    batch = {k: np.zeros((len(samples), SEQ_LEN), dtype) for k, dtype in
             (("input_ids", np.int32), ("loss_mask", np.float32), ("segment_ids", np.int32))}
    batch["input_ids"][:] = tok.pad_id
    batch["tile_mask"] = np.zeros((len(samples), max_tiles), bool)
    for row, (conversation, tiles) in enumerate(samples):
        enc = templates.encode_conversation(conversation, tok, "internlm2_chat", [t * TOKENS_PER_TILE for t in tiles])
        n = len(enc.input_ids)
        batch["input_ids"][row, :n] = enc.input_ids
        batch["loss_mask"][row, :n - 1] = enc.loss_mask[1:]  # loss on the predicted (next) token
        batch["segment_ids"][row, :n] = 1
        batch["tile_mask"][row, :sum(tiles)] = True
    return batch


def test_good_batches_pass_with_summary(tok, caplog):
    batches = [collate(tok, [(QA, [2]), (TEXT_QA, [])]), collate(tok, [(QA, [1]), (QA, [3])])]
    with caplog.at_level(logging.INFO, logger="leo_jax.data.preflight"):
        summary = preflight.check_batches(batches, tok, "internlm2_chat", tokens_per_tile=TOKENS_PER_TILE,
                                          vocab_size=tok.vocab_size)
    assert summary["batches"] == 2 and summary["rows"] == 4
    assert summary["visual_tokens"] == (2 + 1 + 3) * TOKENS_PER_TILE
    assert summary["supervised_tokens"] == 4 * 2  # per row: a one-token answer + <|im_end|>
    assert summary["rows_without_supervision"] == 0
    assert "preflight ok" in caplog.text


def test_no_supervised_tokens(tok):
    batch = collate(tok, [(QA, [1])])
    batch["loss_mask"][:] = 0
    with pytest.raises(ValueError, match="batch 0 has no supervised tokens"):
        preflight.check_batches([batch], tok, "internlm2_chat", tokens_per_tile=TOKENS_PER_TILE)


def test_visual_token_count_disagrees_with_tile_mask(tok):
    batch = collate(tok, [(QA, [2]), (QA, [1])])
    batch["tile_mask"][1, 1] = True  # claims 2 tiles, the text holds tokens for 1
    with pytest.raises(ValueError, match="batch 0 row 1: 4 <IMG_CONTEXT> tokens but .* implies 8"):
        preflight.check_batches([batch], tok, "internlm2_chat", tokens_per_tile=TOKENS_PER_TILE)
    with pytest.raises(ValueError, match="got no tokens_per_tile"):
        preflight.check_batches([batch], tok, "internlm2_chat", tokens_per_image=TOKENS_PER_TILE)


def test_visual_token_count_disagrees_with_image_mask(tok):
    batch = collate(tok, [(QA, [2])])  # 8 context tokens: right for 2 tiles of 4, wrong for 1 image of 64
    batch["image_mask"] = batch.pop("tile_mask")[:, :1]
    with pytest.raises(ValueError, match="8 <IMG_CONTEXT> tokens but the row's image mask implies 64"):
        preflight.check_batches([batch], tok, "llama3", tokens_per_image=64)


def test_broken_image_token_layout(tok):
    batch = collate(tok, [(QA, [2])])
    context = np.flatnonzero(batch["input_ids"][0] == tok.token_to_id(templates.IMG_CONTEXT))
    batch["input_ids"][0, context[-1] + 1] = tok.token_to_id("red")  # drop the </img>
    with pytest.raises(ValueError, match="image token layout is broken"):
        preflight.check_batches([batch], tok, "internlm2_chat", tokens_per_tile=TOKENS_PER_TILE)
    # Right total (8 = 2 tiles x 4) but runs of 2 and 6 tokens: not whole tiles.
    two_images = [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "no"}]
    enc = templates.encode_conversation(two_images, tok, "internlm2_chat", [2, 6])
    batch = collate(tok, [(QA, [2])])
    batch["input_ids"][0, :len(enc.input_ids)] = enc.input_ids
    with pytest.raises(ValueError, match="runs \\[2, 6\\], expected runs of a multiple of 4"):
        preflight.check_batches([batch], tok, "internlm2_chat", tokens_per_tile=TOKENS_PER_TILE)


def test_template_tokens_missing_from_tokenizer(tmp_path):
    tok = load_tokenizer(train_sentencepiece(tmp_path))  # Llama-2-like: no ChatML tokens
    tok.add_special_tokens(list(templates.IMAGE_TOKENS))
    with pytest.raises(ValueError, match="lacks special token\\(s\\) \\['<\\|im_start\\|>', '<\\|im_end\\|>'\\]"):
        preflight.check_batches([], tok, "internlm2_chat", tokens_per_tile=TOKENS_PER_TILE)
    bare = load_tokenizer(train_sentencepiece(tmp_path / "bare"))  # no image tokens either
    with pytest.raises(ValueError, match="\\['<img>', '</img>', '<IMG_CONTEXT>'\\]"):
        preflight.check_batches([], bare, "vicuna_v1", tokens_per_image=64)


def test_ids_beyond_the_model_vocabulary(tok):
    batch = collate(tok, [(QA, [1])])
    with pytest.raises(ValueError, match="'<IMG_CONTEXT>': 11} have ids >= the model's vocab_size 8"):
        preflight.check_batches([batch], tok, "internlm2_chat", tokens_per_tile=TOKENS_PER_TILE, vocab_size=8)
    batch["input_ids"][0, 5] = tok.vocab_size + 7
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size + 7} >= the model's vocab_size"):
        preflight.check_batches([batch], tok, "internlm2_chat", tokens_per_tile=TOKENS_PER_TILE,
                                vocab_size=tok.vocab_size)


def test_empty_iterator_and_max_batches(tok):
    with pytest.raises(ValueError, match="got no batches"):
        preflight.check_batches(iter([]), tok, "internlm2_chat", tokens_per_tile=TOKENS_PER_TILE)

    def endless():
        while True:
            yield collate(tok, [(QA, [1])])

    summary = preflight.check_batches(endless(), tok, "internlm2_chat", tokens_per_tile=TOKENS_PER_TILE,
                                      max_batches=3)
    assert summary["batches"] == 3
