"""LLaVA-format coverage with real-format records (LLaVA-665K / ShareGPT layouts) through the input pipeline:
text-only samples in a mixed batch, `<image>` first / last / absent, `image` as a string or a list, system prompts,
ShareGPT roles, and conversations that cannot be trained on (a clear, counted skip)."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from leo_jax.data import pipeline, sources, templates
from leo_jax.data.tokenizer import SYNTHETIC_TOKENIZER_PATH
from tests.test_pipeline import _config, _context_id, _iterator, _kind

QUESTION = "What are the colors of the bus in the image?"
ANSWER = "The bus in the image is white and red."
# Records as they appear in llava_v1_5_mix665k.json (ids, COCO-style image paths, multi-turn).
RECORDS = {
    "first": {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": ANSWER}]},
    "last": {"id": "last", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": f"{QUESTION}\n<image>"}, {"from": "gpt", "value": ANSWER}]},
    "absent": {"id": "absent", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]},
    "list": {"id": "list", "image": ["coco/train2017/000000033471.jpg"], "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": ANSWER}]},
    "text_only": {"id": "sharegpt_1", "conversations": [
        {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}]},
    "sharegpt_roles": {"id": "roles", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "user", "value": f"<image>\n{QUESTION}"}, {"from": "assistant", "value": ANSWER}]},
    "system_turn": {"id": "sys_turn", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "system", "value": "Answer briefly."}, {"from": "human", "value": f"<image>\n{QUESTION}"},
        {"from": "gpt", "value": ANSWER}]},
    "system_field": {"id": "sys_field", "system": "Answer briefly.", "image": "coco/train2017/000000033471.jpg",
                     "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                       {"from": "gpt", "value": ANSWER}]},
    "starts_with_gpt": {"id": "gpt_first", "conversations": [
        {"from": "gpt", "value": ANSWER}, {"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]},
    "two_humans": {"id": "two_humans", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "human", "value": "And the wheels?"},
        {"from": "gpt", "value": ANSWER}]},
}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_format")
    (root / "images" / "coco" / "train2017").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
        root / "images" / "coco" / "train2017" / "000000033471.jpg")
    with open(root / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in RECORDS.values())
    return root


def _samples(llava_dir, model_kind="leo_mini"):
    """name -> the pipeline's sample dict (or skip marker) for each record."""
    config = _config(llava_dir, "data.jsonl")
    source = sources.open_source(str(llava_dir / "data.jsonl"), str(llava_dir / "images"))
    transform = pipeline.SampleTransform(config, _kind(config, model_kind), training=False)
    return {name: transform(i, (i, source[i])) for i, name in enumerate(RECORDS)}


def _text(ids, mask=None):
    tok = templates.setup_tokenizer(SYNTHETIC_TOKENIZER_PATH, "internlm2_chat")
    return tok.decode(np.asarray(ids)[mask] if mask is not None else ids)


@pytest.mark.parametrize("model_kind", ["leo", "leo_mini"])
def test_image_placement_string_or_list_and_roles(llava_dir, model_kind):
    samples = _samples(llava_dir, model_kind)
    context = _context_id()
    first, last, absent = samples["first"], samples["last"], samples["absent"]
    for name in ("first", "last", "absent", "list", "sharegpt_roles", "system_turn", "system_field", "text_only"):
        assert pipeline.SKIP_KEY not in samples[name], samples[name]
    # The image's tokens sit where its tag is: before the question, or after it.
    first_ctx, last_ctx = np.flatnonzero(first["input_ids"] == context), np.flatnonzero(last["input_ids"] == context)
    first_q, last_q = np.flatnonzero(first["prompt_mask"]), np.flatnonzero(last["prompt_mask"])
    assert len(first_ctx) == len(last_ctx) > 0
    assert first_ctx.max() < first_q.min() and last_ctx.min() > last_q.max()
    # No tag: the image goes first in the first human turn, as LLaVA does -> the same sample as "first".
    for name in ("absent", "list", "sharegpt_roles"):
        for key in ("input_ids", "loss_mask", "prompt_mask"):
            np.testing.assert_array_equal(samples[name][key], first[key], err_msg=f"{name}: {key}")
    assert _text(absent["input_ids"], absent["loss_mask"]).startswith(ANSWER)
    # The system prompt is in the tokens but neither supervised nor part of the conditioning text.
    sys_turn, sys_field = samples["system_turn"], samples["system_field"]
    np.testing.assert_array_equal(sys_turn["input_ids"], sys_field["input_ids"])
    assert "Answer briefly." in _text(sys_turn["input_ids"])
    assert "Answer briefly." not in _text(sys_turn["input_ids"], sys_turn["prompt_mask"] | sys_turn["loss_mask"])
    assert len(sys_turn["input_ids"]) > len(first["input_ids"])
    # Text-only: no image tokens and no visual items.
    text_only = samples["text_only"]
    assert not (text_only["input_ids"] == context).any()
    assert all(v.shape[0] == 0 for k, v in text_only.items() if k.startswith(("pixels_", "patches_", "tiles")))


def test_conversations_that_cannot_train_are_a_clear_counted_skip(llava_dir, caplog):
    samples = _samples(llava_dir)
    assert samples["starts_with_gpt"][pipeline.SKIP_KEY] == pipeline.BAD_CONVERSATION
    assert "alternate human/gpt starting with human" in samples["starts_with_gpt"]["detail"]
    assert samples["two_humans"][pipeline.SKIP_KEY] == pipeline.BAD_CONVERSATION
    assert "turn 1 has 'from'='human'" in samples["two_humans"]["detail"]
    # Through the iterator: counted per reason, logged with the line, the rest batched with text-only rows mixed in.
    caplog.set_level(logging.WARNING, logger=pipeline.logger.name)
    config = _config(llava_dir, "data.jsonl", max_skip_fraction=1.0, global_batch_size=8, eval_batch_size=8)
    config.eval_files, config.eval_image_root = str(llava_dir / "data.jsonl"), str(llava_dir / "images")
    iterator = _iterator("eval", config, "leo_mini")
    batches = list(iterator)
    metrics = iterator.skip_stats.as_metrics()
    iterator.close()
    assert metrics == {"data/records_seen": 10, "data/records_skipped": 2, "data/skipped/bad_conversation": 2}
    assert any("data.jsonl:line 9 (bad_conversation" in m for m in caplog.messages)
    batch = batches[0]
    rows = batch["sample_index"][:, 0]
    assert sorted(rows[rows >= 0].tolist()) == [0, 1, 2, 3, 4, 5, 6, 7]
    text_row = int(np.flatnonzero(rows == 4)[0])
    assert not batch["image_mask"][text_row].any() and batch["image_mask"][rows == 0].sum() == 1


def test_system_field_must_be_a_string():
    record = sources.record_from_json({"system": ["x"], "conversations": RECORDS["first"]["conversations"]}, "", "o")
    assert record.error == (sources.MALFORMED_RECORD, "'system' must be a string")
