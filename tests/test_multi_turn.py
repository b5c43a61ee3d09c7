"""LEO-MINI multi-turn conditioning: what CoTR and the MMoE routers see for answer k is the user turns 1..k, the
same in a training row and in the inference engine's prompt for turn k."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leo_jax.config import load_config
from leo_jax.data import pipeline, synthetic, visual
from leo_jax.infer.chat import InferenceEngine, Request
from leo_jax.infer.generate import prompt_inputs
from leo_jax.models.leo_mini import exchange_index
from leo_jax.models.registry import build_model

TURN_1 = [{"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": "red"}]
TURN_2 = [{"from": "human", "value": "How many circles are there?"}, {"from": "gpt", "value": "two"}]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """A one-turn and a two-turn record about the same image, as one training batch of the tiny LEO-MINI preset."""
    out = tmp_path_factory.mktemp("multi_turn")
    synthetic.write_dataset(str(out), 1, seed=0, val_num=1)
    image = json.loads((out / "data.json").read_text())[0]["image"]
    with open(out / "turns.jsonl", "w") as f:
        for conversations in (TURN_1, TURN_1 + TURN_2):
            f.write(json.dumps({"image": image, "conversations": conversations}) + "\n")
    config = load_config("tiny_leo_mini")
    config.data.update(eval_files=str(out / "turns.jsonl"), eval_image_root=str(out), eval_batch_size=2)
    iterator = pipeline.make_eval_iterator(config.data, visual.for_config(config), process_index=0, process_count=1)
    batch = {k: jnp.asarray(v) for k, v in next(iterator).items() if k != "sample_index"}
    iterator.close()
    config.model.llm = {**config.model.llm, "initializer_range": 0.5}  # varied logits at random init
    return config, batch, str(out / image)


def _token_nll(model, batch):
    logits = model.train_forward(batch).out.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return np.asarray(-jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0])


def test_exchanges_are_read_from_the_answers(rows):
    _, batch, _ = rows
    exchange = np.asarray(exchange_index(batch))
    segments = np.asarray(batch["segment_ids"])
    assert exchange[0][segments[0] > 0].max() == 1 and exchange[1][segments[1] > 0].max() == 2
    answer_1 = np.flatnonzero(np.asarray(batch["loss_mask"][0]))
    # row 1 = row 0's tokens, then the second exchange starting right after answer 1's terminator
    n = int(segments[0].sum())
    np.testing.assert_array_equal(np.asarray(batch["input_ids"][1, :n - 1]), np.asarray(batch["input_ids"][0, :n - 1]))
    assert (exchange[1, :answer_1[-1] + 2] == 1).all() and exchange[1, answer_1[-1] + 2] == 2


@pytest.mark.parametrize("conditioning", ["turns_so_far", "first_turn", "all_turns"])
def test_answer_1_is_unchanged_by_a_second_turn(rows, conditioning):
    """Bit-identical loss on answer 1's tokens whether or not a second turn follows (the leak of 'all_turns'
    changes it: the check can fail)."""
    config, batch, _ = rows
    model_config = config.model.copy_and_resolve_references()
    model_config.conditioning = conditioning
    model = build_model(model_config, nnx.Rngs(0))
    nll = _token_nll(model, batch)
    answer_1 = np.flatnonzero(np.asarray(batch["loss_mask"][0]))
    assert len(answer_1) >= 2
    difference = np.abs(nll[0, answer_1] - nll[1, answer_1]).max()
    print(f"{conditioning}: answer-1 token losses {nll[0, answer_1]}, max |one turn - two turns| {difference:.3g}")
    if conditioning == "all_turns":
        assert difference > 1e-4
    else:
        np.testing.assert_array_equal(nll[0, answer_1], nll[1, answer_1])


def test_engine_inputs_for_turn_k_equal_the_training_conditioning_of_answer_k(rows):
    config, batch, image = rows
    model = build_model(config.model, nnx.Rngs(0))
    engine = InferenceEngine(model, config)
    text, has_text, token_prompt = (np.asarray(x) for x in model.conditioning(batch))
    _, routing = model.embed_inputs(batch)
    loss_mask = np.asarray(batch["loss_mask"][1]) > 0
    exchange = np.asarray(exchange_index(batch))[1]
    worst = 0.0
    for k, turns in ((1, TURN_1[:1]), (2, TURN_1 + TURN_2[:1])):
        prepared, lengths = engine.prepare([Request(tuple(turns), (image,))])
        length = int(lengths[0])
        e_text, e_has, e_prompt = (np.asarray(x) for x in model.conditioning(prepared))
        # The image is compressed with the same text (its turn, the first) in the training row and for turn k.
        np.testing.assert_array_equal(e_has[0, :1], has_text[1, :1])
        np.testing.assert_allclose(e_text[0, 0], text[1, 0], rtol=0, atol=1e-6)
        # New tokens of turn k are routed with what answer k's tokens see in training (the user turns 1..k) ...
        _, _, step, prefill = prompt_inputs(model, {k2: jnp.asarray(v) for k2, v in prepared.items()},
                                            jnp.asarray(lengths))
        answer_k = np.flatnonzero(loss_mask & (exchange == k)) + 1  # loss_mask marks the token before each target
        for position in answer_k:
            np.testing.assert_allclose(np.asarray(step.prompt)[0, 0], token_prompt[1, position], rtol=0, atol=1e-6)
            np.testing.assert_allclose(np.asarray(step.visual)[0, 0], np.asarray(routing.visual)[1, position],
                                       rtol=0, atol=1e-6)
        # ... and every prompt token as the same token of the training row.
        pad = np.asarray(prefill.prompt).shape[1] - length
        np.testing.assert_allclose(np.asarray(prefill.prompt)[0, pad:], token_prompt[1, :length], rtol=0, atol=1e-6)
        worst = max(worst, float(np.abs(np.asarray(step.prompt)[0, 0] - token_prompt[1, answer_k[0]]).max()))
    # turn 2's routing context differs from turn 1's: the second question is in it
    assert np.abs(token_prompt[1, np.flatnonzero(exchange == 2)[-1]] - token_prompt[1, 0]).max() > 1e-3
    print(f"engine vs training conditioning: max |difference| {worst:.3g}")
