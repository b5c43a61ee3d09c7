"""Generation from images + prompts through the training pipeline: KV-cache decoding == greedy full forwards (tiny
LEO, LEO-MINI, plain LLM), batched == one by one, streaming == compiled loop, stop tokens, multi-turn chat inputs,
and the `python -m leo_jax.generate` command line."""

from __future__ import annotations

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leo_jax.config import load_config
from leo_jax.data import pipeline, synthetic, templates
from leo_jax.infer.chat import Chat, InferenceEngine, InputError, Request
from leo_jax.infer.generate import SamplingConfig
from leo_jax.models.registry import build_model
from leo_jax.train.evaluate import prompt_lengths
from train_helpers import llm_train_config

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.write_dataset(str(out), 4, seed=0, val_num=4, multi_turn_fraction=0.0, multi_image_fraction=0.0,
                            text_only_fraction=0.0)
    return out


@pytest.fixture(scope="module")
def images(synthetic_dir):
    """Four synthetic 64 px images (different scenes): their paths."""
    return [str(synthetic_dir / "images" / "val" / f"{i:06d}.png") for i in range(4)]


# Random LLM weights of std 0.02 at width 128 give near-constant logits (greedy repeats one id); std 0.5 gives
# varied sequences with clear argmax margins, so the comparisons below are not trivially satisfied.
INIT_STD = 0.5


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """kind -> InferenceEngine over a fresh tiny model with random weights."""
    llm = llm_train_config(str(tmp_path_factory.mktemp("llm")))
    llm.model.initializer_range = INIT_STD
    configs = {"leo": load_config("tiny_leo"), "leo_mini": load_config("tiny_leo_mini"), "llm": llm}
    for kind in ("leo", "leo_mini"):
        configs[kind].model.llm = {**configs[kind].model.llm, "initializer_range": INIT_STD}
    return {kind: InferenceEngine(build_model(config.model, nnx.Rngs(0)), config) for kind, config in configs.items()}


def requests_for(kind: str, images: list[str]) -> list[Request]:
    """Three prompts of different lengths (and different images for the vision models)."""
    questions = ["What color is the square?", "What shape is the red object?",
                 "Is the red circle left or right of the blue square?"]
    return [Request.single(q, [] if kind == "llm" else [images[i]]) for i, q in enumerate(questions)]


def no_stop(engine: InferenceEngine, **kw) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=NEW_TOKENS, pad_id=int(engine.tokenizer.pad_id), **kw)


def greedy_by_full_forwards(engine: InferenceEngine, request: Request, steps: int) -> list[int]:
    """Reference: the whole sequence (prompt + tokens so far) re-run through `train_forward` every step, argmax of
    the last position. One fixed-size buffer, so it compiles once (causal: later slots cannot change the logits)."""
    batch, lengths = engine.prepare([request])
    length = int(lengths[0])
    width = batch["input_ids"].shape[1] + steps
    grown = {k: v for k, v in batch.items() if k not in ("labels", "loss_mask")}
    for key in ("input_ids", "segment_ids", "positions", "prompt_mask"):
        grown[key] = np.zeros((1, width), batch[key].dtype)
        grown[key][:, :length] = batch[key][:, :length]
    forward = jax.jit(lambda state, b: nnx.merge(engine.graphdef, state).train_forward(b).out)
    tokens = []
    for cur in range(length, length + steps):
        logits = forward(engine.state, {k: jnp.asarray(v) for k, v in grown.items()})
        token = int(jnp.argmax(logits[0, cur - 1]))
        tokens.append(token)
        grown["input_ids"][0, cur] = token
        grown["segment_ids"][0, cur] = 1
        grown["positions"][0, cur] = cur
    return tokens


@pytest.mark.parametrize("kind", ["leo", "leo_mini"])
def test_prompt_inputs_equal_the_training_rows_up_to_the_answer(engines, synthetic_dir, kind):
    """For every validation record, the engine's model input (tokens, prompt mask, tiles / expert pixels) equals the
    training pipeline's row for that record up to its first answer token (what the training-time evaluator feeds
    the model). The shipped byte-level BPE tokenizer splits the Llama 3 header's "\n\n" differently before an
    answer than at the end of a string, so this fails if the generation prompt is rendered by cutting the text."""
    engine = engines[kind]
    data = engine.config.data.copy_and_resolve_references()
    data.update(eval_files=str(synthetic_dir / "val.json"), eval_batch_size=4)
    data.leo.jpeg_augment = False
    batch = next(iter(pipeline.make_eval_iterator(data, engine.kind, process_index=0, process_count=1)))
    lengths = prompt_lengths(batch["loss_mask"])
    records = json.loads((synthetic_dir / "val.json").read_text())
    requests = [Request(tuple(r["conversations"][:1]), (str(synthetic_dir / r["image"]),)) for r in records]
    prepared, prepared_lengths = engine.prepare(requests)
    np.testing.assert_array_equal(prepared_lengths, lengths)
    mask_key = "tile_mask" if kind == "leo" else "image_mask"
    for row, length in enumerate(lengths):
        for key in ("input_ids", "prompt_mask", "positions"):
            np.testing.assert_array_equal(prepared[key][row, :length], batch[key][row, :length], err_msg=key)
        for key in engine.layout.visual_specs:
            np.testing.assert_array_equal(prepared[key][row][prepared[mask_key][row]],
                                          batch[key][row][batch[mask_key][row]], err_msg=key)


@pytest.mark.parametrize("kind", ["leo", "leo_mini", "llm"])
def test_kv_cache_generation_equals_greedy_full_forwards(engines, images, kind):
    engine = engines[kind]
    request = requests_for(kind, images)[2]
    cached = engine.generate_tokens([request], no_stop(engine))[0].tolist()
    assert cached == greedy_by_full_forwards(engine, request, NEW_TOKENS)
    assert len(set(cached)) > 1  # a real sequence, not one repeated id


@pytest.mark.parametrize("kind", ["leo", "leo_mini"])
def test_batched_equals_one_by_one(engines, images, kind):
    """Prompts of different lengths with different images, left-padded in one batch == each alone."""
    engine = engines[kind]
    requests = requests_for(kind, images)
    batch, lengths = engine.prepare(requests)
    assert len(set(lengths.tolist())) == 3
    batched = engine.generate_tokens(requests, no_stop(engine))
    for row, request in enumerate(requests):
        np.testing.assert_array_equal(batched[row], engine.generate_tokens([request], no_stop(engine))[0])
    assert not np.array_equal(batched[0], batched[1])


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (0.9, 0.8)])
def test_streaming_yields_the_compiled_tokens(engines, images, temperature, top_p):
    engine = engines["leo_mini"]
    requests = requests_for("leo_mini", images)[:2]
    sampling = no_stop(engine, temperature=temperature, top_p=top_p)
    compiled = engine.generate_tokens(requests, sampling, seed=3)
    streamed = np.stack(list(engine.stream_tokens(requests, sampling, seed=3)), axis=1)
    np.testing.assert_array_equal(streamed, compiled)


def test_stop_tokens_end_a_row(engines, images):
    """A stop id ends its row (pad after it) in the compiled and the streaming path; the answer text ends before
    it; once every row has stopped the stream ends early."""
    engine = engines["leo_mini"]
    requests = requests_for("leo_mini", images)[:2]
    free = engine.generate_tokens(requests, no_stop(engine))
    k = next(i for i in range(1, NEW_TOKENS) if free[0, i] not in free[0, :i])  # row 0's first repeat-free token
    stop = int(free[0, k])
    pad = int(engine.tokenizer.pad_id)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, eos_ids=(stop,), pad_id=pad)
    stopped = engine.generate_tokens(requests, sampling)
    np.testing.assert_array_equal(stopped[0], [*free[0, :k + 1], *[pad] * (NEW_TOKENS - k - 1)])
    first = list(free[1]).index(stop) if stop in free[1] else NEW_TOKENS
    np.testing.assert_array_equal(stopped[1, :first + 1], free[1, :first + 1])
    assert (stopped[1, first + 1:] == pad).all()
    streamed = list(engine.stream_tokens(requests, sampling))
    np.testing.assert_array_equal(np.stack(streamed, 1), stopped[:, :len(streamed)])
    single = list(engine.stream_tokens(requests[:1], sampling))
    assert len(single) == k + 1  # the stream ends right after the stop token
    text = engine.tokenizer.decode([int(t) for t in free[0, :k]], skip_special_tokens=True).strip()
    assert engine.generate(requests[:1], sampling) == [text]
    assert "".join(engine.stream(requests[0], sampling)) == text


def test_template_stop_ids_are_used(engines):
    engine = engines["leo_mini"]
    assert engine.sampling().eos_ids == tuple(templates.stop_token_ids(engine.tokenizer, "llama3"))
    assert engine.tokenizer.token_to_id("<|eot_id|>") in engine.sampling().eos_ids


@pytest.mark.parametrize("kind", ["leo", "leo_mini"])
def test_chat_second_turn_input_is_the_whole_conversation(engines, images, kind):
    """Turn 2's model input == the template rendering of (turn 1, the model's answer, turn 2) with both images."""
    engine = engines[kind]
    chat = Chat(engine)
    answer = chat.ask("What color is the square?", [images[0]], engine.sampling(max_new_tokens=3))
    batch, lengths = engine.prepare([chat.request("And how many circles are there?", [images[1]])])
    conversation = [{"from": "human", "value": "<image>\nWhat color is the square?"},
                    {"from": "gpt", "value": answer},
                    {"from": "human", "value": "<image>\nAnd how many circles are there?"}]
    key, mask_key = ("tiles", "tile_mask") if kind == "leo" else ("pixels_clip", "image_mask")
    alone = [engine.prepare([Request.single("x", [image])])[0] for image in images[:2]]
    if kind == "leo":  # an image's visual tokens: its own tile count (from its tiling) x tokens per tile
        counts = [int(a[mask_key].sum()) * engine.kind.tokens_per_tile for a in alone]
    else:
        counts = [engine.kind.tokens_per_image] * 2
    expected = templates.encode_conversation(conversation, engine.tokenizer, engine.config.data.template, counts,
                                             add_generation_prompt=True).input_ids
    np.testing.assert_array_equal(batch["input_ids"][0, :int(lengths[0])], expected)
    visual = np.concatenate([a[key][0][a[mask_key][0]] for a in alone])  # both images, in turn order
    np.testing.assert_array_equal(batch[key][0][batch[mask_key][0]], visual)
    # the streamed variant records the same history
    streamed = Chat(engine)
    pieces = list(streamed.ask_stream("What color is the square?", [images[0]], engine.sampling(max_new_tokens=3)))
    assert "".join(pieces).strip() == answer and streamed.turns == chat.turns[:2] and streamed.images == chat.images[:1]


def test_bad_requests_are_clear_errors(engines, images, tmp_path):
    engine = engines["leo_mini"]
    with pytest.raises(InputError, match=r"request 0: missing_image: .*nope\.png"):
        engine.generate([Request.single("What?", [str(tmp_path / "nope.png")])])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"request 1: corrupt_image"):
        engine.generate([Request.single("What?", [images[0]]), Request.single("What?", [str(tmp_path / "bad.png")])])
    with pytest.raises(InputError, match="image_tag_mismatch"):
        engine.generate([Request.single("<image> <image> What?", [images[0]])])


def test_generate_cli_parses_and_reports_bad_input(tmp_path, capsys):
    from leo_jax import generate as cli

    assert cli.group_requests([("image", "a"), ("prompt", "p"), ("prompt", "q"), ("image", "b"), ("image", "c"),
                               ("prompt", "r")]) == [("p", ["a"]), ("q", []), ("r", ["b", "c"])]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0 and "--max-new-tokens" in capsys.readouterr().out
    (tmp_path / "bad.png").write_bytes(b"not a png")
    for argv, message in [
        (["--ckpt", str(tmp_path), "--image", str(tmp_path / "missing.png"), "--prompt", "hi"], "file not found"),
        (["--ckpt", str(tmp_path), "--image", str(tmp_path / "bad.png"), "--prompt", "hi"], "not a readable image"),
        (["--ckpt", str(tmp_path), "--prompt", "hi", "--image", str(tmp_path / "bad.png")], "not followed by"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert cli.main(["--ckpt", str(tmp_path), "--prompt", "hi"]) == 2
    assert f"no checkpoints found in {tmp_path}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_llm(tmp_path_factory):
    """A training workdir with the tiny LLM trained for 6 steps on the text set (checkpoints at 3 and 6)."""
    from leo_jax.train.loop import Trainer

    workdir = str(tmp_path_factory.mktemp("trained_llm"))
    Trainer(llm_train_config(workdir), workdir).run()
    return workdir


def test_generate_cli_streams_batches_and_chats(trained_llm, capsys):
    """On a trained checkpoint: one prompt streams its answer, several print one answer each, --chat keeps the
    history (the second turn's answer equals the engine's answer to the whole conversation)."""
    from leo_jax import generate as cli
    from leo_jax.checkpoints import load_trained

    workdir = trained_llm
    engine = InferenceEngine(*load_trained(workdir))
    sampling = engine.sampling(max_new_tokens=4)
    questions = ["What is two plus three?", "What is one plus four?"]
    out = io.StringIO()
    assert cli.main(["--ckpt", workdir, "--prompt", questions[0], "--max-new-tokens", "4"], out=out) == 0
    assert out.getvalue() == engine.generate([Request.single(questions[0])], sampling)[0] + "\n"
    out = io.StringIO()
    assert cli.main(["--ckpt", workdir, "--prompt", questions[0], "--prompt", questions[1], "--max-new-tokens", "4"],
                    out=out) == 0
    answers = engine.generate([Request.single(q) for q in questions], sampling)
    assert out.getvalue() == "".join(f"[{i}] {q}\n{a}\n" for i, (q, a) in enumerate(zip(questions, answers)))
    out = io.StringIO()
    assert cli.main(["--ckpt", workdir, "--chat", "--max-new-tokens", "4"], stdin=io.StringIO("\n".join(questions)),
                    out=out) == 0
    chat = Chat(engine)
    expected = [chat.ask(q, sampling=sampling) for q in questions]
    assert out.getvalue() == "".join(f"assistant: {a}\n" for a in expected)


def logprob_by_full_forward(engine: InferenceEngine, request: Request, tokens: list[int]) -> tuple[float, bool]:
    """Reference for `loglikelihood`: prompt + continuation through `train_forward` (no cache, no left padding)."""
    batch, lengths = engine.prepare([request])
    length = int(lengths[0])
    grown = {k: v for k, v in batch.items() if k not in ("labels", "loss_mask")}
    for key in ("input_ids", "segment_ids", "positions", "prompt_mask"):
        grown[key] = np.zeros((1, batch["input_ids"].shape[1] + len(tokens)), batch[key].dtype)
        grown[key][:, :length] = batch[key][:, :length]
    grown["input_ids"][0, length:length + len(tokens)] = tokens
    grown["segment_ids"][0, length:length + len(tokens)] = 1
    grown["positions"][0, length:length + len(tokens)] = np.arange(length, length + len(tokens))
    logits = nnx.merge(engine.graphdef, engine.state).train_forward({k: jnp.asarray(v) for k, v in grown.items()}).out
    logprobs = jax.nn.log_softmax(logits[0, length - 1:length - 1 + len(tokens)].astype(jnp.float32), axis=-1)
    total = float(sum(logprobs[i, t] for i, t in enumerate(tokens)))
    return total, all(int(jnp.argmax(logprobs[i])) == t for i, t in enumerate(tokens))


@pytest.mark.parametrize("kind", ["leo_mini", "llm"])
def test_loglikelihood_equals_full_forward_scores(engines, images, kind):
    """Batched continuation log-likelihoods (prompts of different lengths, continuations of different lengths) equal
    the full-forward reference; the model's own greedy answer is reported greedy, another text is not."""
    engine = engines[kind]
    requests = requests_for(kind, images)
    greedy = engine.generate_tokens(requests[:1], no_stop(engine))[0].tolist()
    # the longest start of the greedy answer whose text round-trips to the same tokens (random weights emit
    # sequences that BPE would merge differently)
    size = max(k for k in range(1, len(greedy) + 1) if engine.tokenizer.encode(engine.tokenizer.decode(greedy[:k]))
               == greedy[:k])
    greedy_text = engine.tokenizer.decode(greedy[:size])
    continuations = [greedy_text, " red", "a blue square"]
    scores = engine.loglikelihood(requests, continuations)
    for request, text, (logprob, is_greedy) in zip(requests, continuations, scores):
        expected, expected_greedy = logprob_by_full_forward(engine, request, engine.tokenizer.encode(text.lstrip()))
        assert logprob == pytest.approx(expected, abs=1e-3) and is_greedy == expected_greedy
    assert scores[0][1] and not scores[2][1] and scores[0][0] > scores[2][0]
    with pytest.raises(InputError, match="has no tokens to score"):
        engine.loglikelihood(requests[:1], [" "])
