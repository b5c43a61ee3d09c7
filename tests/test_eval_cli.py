"""Loading trained checkpoints (`load_trained`) and `python -m leo_jax.eval`: parameters restored bit for bit, the
evaluator's files agree with leo_jax.scoring, clear errors for bad checkpoints and bad benchmark files."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from leo_jax import scoring as metrics
from leo_jax.checkpoints import find_checkpoint, load_trained
from leo_jax.config import load_config
from leo_jax.data import synthetic
from leo_jax.eval import benchmark
from leo_jax.eval.__main__ import main as eval_main
from leo_jax.train.loop import Trainer
from train_helpers import llm_train_config, save_step0_checkpoint


def flat(state) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def trained_llm(tmp_path_factory):
    """(workdir, trainer) after 6 steps of the tiny LLM (checkpoints at steps 3 and 6)."""
    workdir = str(tmp_path_factory.mktemp("llm"))
    trainer = Trainer(llm_train_config(workdir), workdir)
    trainer.run()
    return workdir, trainer


@pytest.fixture(scope="module")
def leo_mini_checkpoint(tmp_path_factory):
    """(workdir, synthetic dir): a fresh tiny LEO-MINI train state saved as the trainer saves it (step 0), and the
    synthetic set (with its benchmark-format val.jsonl)."""
    root = tmp_path_factory.mktemp("leo_mini")
    data_dir, workdir = str(root / "synthetic"), str(root / "run")
    synthetic.write_dataset(data_dir, 16, seed=0, val_num=10, multi_turn_fraction=0.0, multi_image_fraction=0.0,
                            text_only_fraction=0.0)
    config = load_config("tiny_leo_mini_train")
    config.data.update(train_files=os.path.join(data_dir, "data.json"), eval_files=os.path.join(data_dir, "val.json"))
    save_step0_checkpoint(config, workdir)
    return workdir, data_dir


def test_load_trained_restores_the_trainers_parameters_bit_for_bit(trained_llm):
    workdir, trainer = trained_llm
    model, config = load_trained(workdir)
    expected = {**flat(trainer.state.trainable), **flat(trainer.state.frozen)}
    loaded = flat(nnx.state(model))
    assert sorted(loaded) == sorted(expected) and expected
    for key, value in expected.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=str(key))
    assert config.model.to_dict() == trainer.config.model.to_dict()
    assert config.data.template == "llama3" and config.train.steps == 6

    # the workdir, its checkpoints/ dir and the newest step dir name the same checkpoint; an older step differs
    step_dir, step = find_checkpoint(workdir)
    assert step == 6 and find_checkpoint(os.path.join(workdir, "checkpoints")) == (step_dir, 6)
    older = flat(nnx.state(load_trained(os.path.join(workdir, "checkpoints", "3"))[0]))
    assert any(not np.array_equal(older[k], v) for k, v in expected.items())

    half = flat(nnx.state(load_trained(str(step_dir), dtype="bfloat16")[0]))
    for key, value in expected.items():
        assert half[key].dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(half[key], value.astype(jax.numpy.bfloat16))


def test_load_trained_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no checkpoints found in {tmp_path}: expected step directories"):
        load_trained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trained(str(tmp_path / "missing"))
    (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)  # an interrupted save only
    with pytest.raises(FileNotFoundError, match=f"no checkpoints found in {tmp_path / 'checkpoints'}"):
        load_trained(str(tmp_path))


def test_synthetic_val_jsonl_is_the_val_set_in_benchmark_form(leo_mini_checkpoint):
    _, data_dir = leo_mini_checkpoint
    val = json.load(open(os.path.join(data_dir, "val.json")))
    records = benchmark.read_benchmark(os.path.join(data_dir, "val.jsonl"))
    assert [r.id for r in records] == [r["id"] for r in val]
    for record, raw in zip(records, val):
        assert record.references == (raw["conversations"][1]["value"],) and record.metric == "exact_match"
        assert "<image>\n" + record.question == raw["conversations"][0]["value"]
        assert record.images == (os.path.join(data_dir, raw["image"]),) and record.question_type == raw["question_type"]


def test_eval_cli_writes_predictions_and_a_summary_that_metrics_agree_with(leo_mini_checkpoint, tmp_path, capsys):
    """End to end on the synthetic val set plus records scored by other metrics (a per-record 'metric', ten VQA
    answers -> vqa_accuracy, options -> multiple_choice)."""
    workdir, data_dir = leo_mini_checkpoint
    lines = open(os.path.join(data_dir, "val.jsonl")).read().splitlines()[:6]
    extra = [dict(json.loads(lines[0]), id="anls-0", metric="anls"),
             dict(json.loads(lines[1]), id="vqa-0", answers=["red"] * 4 + ["blue"] * 6),
             dict(json.loads(lines[2]), id="mc-0", answers=["B"], options=["circle", "square", "triangle"])]
    data = tmp_path / "bench.jsonl"
    data.write_text("\n".join(lines + [json.dumps(e) for e in extra]) + "\n")
    os.symlink(os.path.join(data_dir, "images"), tmp_path / "images")
    out = tmp_path / "out"
    assert eval_main(["--ckpt", workdir, "--data", str(data), "--out", str(out), "--batch-size", "4",
                      "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr()
    assert "overall:" in printed.out and "[eval] 9/9 samples" in printed.err

    predictions = [json.loads(line) for line in open(out / "predictions.jsonl")]
    summary = json.load(open(out / "summary.json"))
    records = benchmark.read_benchmark(str(data))
    assert [p["id"] for p in predictions] == [r.id for r in records]
    assert [p["metric"] for p in predictions] == ["exact_match"] * 6 + ["anls", "vqa_accuracy", "multiple_choice"]
    for p, record in zip(predictions, records):
        assert p["references"] == list(record.references) and p["question"] == record.question
        scored = {"prediction": p["prediction"], "answers": p["references"], **(
            {"options": p["options"]} if "options" in p else {})}
        assert p["score"] == metrics.score_record(scored, [p["metric"]])[p["metric"]]
    assert summary["num_samples"] == 9 and summary["step"] == 0
    assert summary["score"] == pytest.approx(np.mean([p["score"] for p in predictions]), abs=1e-12)
    for name in ("exact_match", "anls", "vqa_accuracy", "multiple_choice"):
        group = [{"prediction": p["prediction"], "answers": p["references"], "question_type": p["question_type"],
                  **({"options": p["options"]} if "options" in p else {})} for p in predictions if p["metric"] == name]
        assert summary["per_metric"][name] == metrics.score(group, [name])
    for question_type, result in summary["per_question_type"].items():
        scores = [p["score"] for p in predictions if p["question_type"] == question_type]
        assert result == {"num_samples": len(scores), "score": pytest.approx(np.mean(scores), abs=1e-12)}

    # --limit and the default output directory (WORKDIR/eval/<stem>-step<N>)
    assert eval_main(["--ckpt", workdir, "--data", str(data), "--limit", "2", "--batch-size", "4",
                      "--max-new-tokens", "3"]) == 0
    default = os.path.join(workdir, "eval", "bench-step0")
    limited = [json.loads(line) for line in open(os.path.join(default, "predictions.jsonl"))]
    assert [p["prediction"] for p in limited] == [p["prediction"] for p in predictions[:2]]


def test_summary_equals_metrics_on_known_predictions(tmp_path):
    """`score_predictions` + `summarize` on hand-made predictions (non-zero scores) == metrics.py."""
    data = tmp_path / "b.jsonl"
    rows = [{"id": "a", "question": "q", "answer": "red", "question_type": "color"},
            {"id": "b", "question": "q", "answers": ["two"], "question_type": "count"},
            {"id": "c", "question": "q", "answers": ["yes"] * 2 + ["no"] * 8, "question_type": "exists"},
            {"id": "d", "question": "q", "answer": "hello world", "metric": "anls"},
            {"id": "e", "question": "Which?", "answer": "A", "choices": {"A": "cat", "B": "dog"}}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = benchmark.read_benchmark(str(data))
    assert records[4].prompt() == "Which?\nA. cat\nB. dog\n" + benchmark.MULTIPLE_CHOICE_INSTRUCTION
    predictions = ["Red.", "2", "yes", "hello wrld", "(A) cat"]
    lines = benchmark.score_predictions(records, predictions)
    # "yes" with 2 of 10 annotators: 2 leave-one-out subsets with 1 match (1/3), 8 with 2 (2/3) -> 0.6;
    # "hello wrld": one edit in 11 characters -> 10/11
    assert [line["score"] for line in lines] == pytest.approx([1.0, 1.0, 0.6, 10 / 11, 1.0])
    summary = benchmark.summarize(records, lines)
    assert summary["score"] == pytest.approx(np.mean([line["score"] for line in lines]))
    assert summary["per_metric"]["exact_match"] == metrics.score(
        [{"prediction": p, "answers": list(r.references), "question_type": r.question_type}
         for p, r in zip(predictions[:2], records[:2])], ["exact_match"])
    assert summary["per_question_type"]["exists"] == {"num_samples": 1, "score": pytest.approx(0.6)}


@pytest.mark.parametrize("line, message", [
    ({"id": "x", "image": "images/val/000000.png", "answers": ["red"]}, "missing field 'question'"),
    ({"question": "q?", "image": "images/val/000000.png"}, "missing field 'answer'"),
    ({"question": "q?", "answers": "red", "image": "nope.png"}, "field 'image': file 'nope.png' not found"),
    ({"question": "q?", "answers": [1]}, "field 'answers' must be a non-empty list of strings"),
    ({"question": "q?", "answer": "red", "metric": "bleu"}, "metric 'bleu' is unknown"),
    ("{not json", "not valid JSON"),
])
def test_bad_benchmark_lines_name_file_line_and_field(leo_mini_checkpoint, tmp_path, capsys, line, message):
    workdir, data_dir = leo_mini_checkpoint
    data = tmp_path / "bad.jsonl"
    good = open(os.path.join(data_dir, "val.jsonl")).readline()
    data.write_text(good.replace('"images/', f'"{data_dir}/images/') + (line if isinstance(line, str)
                                                                       else json.dumps(line)) + "\n")
    assert eval_main(["--ckpt", workdir, "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    assert f"error: {data}:2: " in (err := capsys.readouterr().err) and message in err
    assert not (tmp_path / "out").exists()


def test_eval_cli_help_and_bad_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--help"])
    assert exit_info.value.code == 0 and "--batch-size" in capsys.readouterr().out
    data = tmp_path / "b.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert eval_main(["--ckpt", str(tmp_path), "--data", str(data)]) == 2
    assert f"no checkpoints found in {tmp_path}" in capsys.readouterr().err
