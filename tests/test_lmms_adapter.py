"""The lmms-eval adapter's request handling (leo_jax.eval.lmms) through small stand-ins for lmms-eval's Instance
objects: answers equal the engine's for the same prompts, `until` and `max_new_tokens` are honoured, batching does
not change answers, loglikelihood is the loss -log P of the engine (lmms-eval picks the lowest), the local task
writer (leo_jax.eval.lmms_task) scores as `python -m leo_jax.eval`. Runs without
lmms-eval installed."""

from __future__ import annotations

import dataclasses
import os

import pytest
from flax import nnx

from leo_jax.eval.lmms import LmmsRequests, cut_at_stops, flatten_visuals
from leo_jax.infer.chat import InferenceEngine, Request
from leo_jax.models.registry import build_model
from train_helpers import llm_train_config

QUESTIONS = ["What color is the square?", "What shape is the red object?", "Is the circle left of the square?"]


@dataclasses.dataclass
class FakeInstance:
    """What the adapter reads of lmms-eval's Instance: `args`."""

    args: tuple


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    config = llm_train_config(str(tmp_path_factory.mktemp("llm")))
    config.model.initializer_range = 0.5  # varied greedy answers (see test_generate)
    return InferenceEngine(build_model(config.model, nnx.Rngs(0)), config)


def adapter(engine, batch_size: int) -> LmmsRequests:
    out = LmmsRequests(engine, batch_size=batch_size)
    out.task_dict = {"toy": {"test": [{"question": q} for q in QUESTIONS]}}
    return out


def no_visual(doc):
    return None


def test_generate_until_answers_as_the_engine(engine):
    gen = {"max_new_tokens": 5, "until": ["\n\n"]}
    requests = [FakeInstance((q, dict(gen), no_visual, i, "toy", "test")) for i, q in enumerate(QUESTIONS)]
    expected = engine.generate([Request.single(q) for q in QUESTIONS], engine.sampling(max_new_tokens=5))
    assert adapter(engine, 1).generate_until(requests) == expected
    assert adapter(engine, 2).generate_until(requests) == expected  # batched (last batch filled up) == one by one
    assert len(set(expected)) > 1
    # a stop string cuts the answer at its first occurrence
    stop = expected[0][len(expected[0]) // 2:][:2]
    cut = adapter(engine, 1).generate_until([FakeInstance((QUESTIONS[0], {"max_new_tokens": 5, "until": stop},
                                                           no_visual, 0, "toy", "test"))])
    assert stop and cut == [expected[0].split(stop, 1)[0].strip()]


def test_loglikelihood_scores_and_multiple_choice(engine):
    choices = ["red", "blue", "green"]
    requests = [FakeInstance((QUESTIONS[0], f" {c}", no_visual, 0, "toy", "test")) for c in choices]
    scores = adapter(engine, 2).loglikelihood(requests)
    expected = engine.loglikelihood([Request.single(QUESTIONS[0])] * 3, choices)
    # lmms-eval's convention: a loss (-log P), its multiple-choice scoring takes the argmin
    assert [s for s, _ in scores] == pytest.approx([-s for s, _ in expected], abs=1e-4)
    assert len({round(s, 3) for s, _ in scores}) == 3 and all(s > 0 for s, _ in scores)
    assert min(range(3), key=lambda i: scores[i][0]) == max(range(3), key=lambda i: expected[i][0])
    # a doc_to_target callable gives the continuation from the document
    (by_target,) = adapter(engine, 1).loglikelihood([FakeInstance((QUESTIONS[0], lambda doc: "blue", no_visual, 0,
                                                                   "toy", "test"))])
    assert by_target[0] == pytest.approx(scores[1][0], abs=1e-4)


def test_request_helpers_and_errors(engine):
    assert flatten_visuals(None) == [] and flatten_visuals(["a", ["b", "c"]]) == ["a", "b", "c"]
    assert cut_at_stops("red.\n\nblue", ["\n\n", "."]) == "red"
    with pytest.raises(ValueError, match="task 'toy' split 'test' document 7: no such document"):
        adapter(engine, 1).generate_until([FakeInstance(("q", {}, no_visual, 7, "toy", "test"))])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        LmmsRequests(engine, batch_size=0)


def test_lmms_task_documents_score_as_the_benchmark(tmp_path):
    """leo_jax.eval.lmms_task: each document's prompt is the benchmark's, process_results gives the benchmark's
    per-record score (multiple choice included), the YAML points at the data file and the module's functions."""
    import json

    import yaml
    from PIL import Image

    from leo_jax.eval import benchmark, lmms_task

    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red.png")
    lines = [{"id": "a", "question": "What color?", "image": "red.png", "answers": ["red"]},
             {"id": "b", "question": "Which animal?", "options": ["cat", "dog"], "answer": "B"},
             {"id": "c", "question": "Name it.", "answers": ["Red", "red", "a red square"], "metric": "vqa_accuracy"}]
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    data_file, yaml_file = lmms_task.write_task(str(data), str(tmp_path / "tasks"), "toy", max_new_tokens=5)
    docs = [json.loads(line) for line in open(data_file)]
    records = benchmark.read_benchmark(str(data))
    assert [d["prompt"] for d in docs] == [r.prompt() for r in records]
    assert "Answer with the option's letter" in docs[1]["prompt"]
    (visual,) = lmms_task.doc_to_visual(docs[0])
    assert visual.mode == "RGB" and visual.getpixel((0, 0)) == (200, 10, 10)
    predictions = ["red", "The answer is B.", "red"]
    expected = [line["score"] for line in benchmark.score_predictions(records, predictions)]
    assert [lmms_task.process_results(d, [p])["score"] for d, p in zip(docs, predictions)] == expected
    assert expected == [1, 1, pytest.approx(4 / 9)]  # VQA accuracy: 2 of 3 annotators, leave-one-out mean
    assert lmms_task.process_results(docs[1], ["A"])["score"] == 0

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load(open(yaml_file), Loader=Loader)
    assert config["task"] == "toy" and config["dataset_kwargs"]["data_files"]["test"] == os.path.basename(data_file)
    assert config["generation_kwargs"]["max_new_tokens"] == 5
    for key in ("doc_to_visual", "doc_to_text", "doc_to_target", "process_results"):
        assert config[key] == f"leo_jax.eval.lmms_task.{key}"
    with pytest.raises(ValueError, match="task name 'bad name'"):
        lmms_task.write_task(str(data), str(tmp_path / "tasks"), "bad name")
