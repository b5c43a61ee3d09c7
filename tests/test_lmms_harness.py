"""lmms-eval's own evaluator (`python -m lmms_eval --model leo_jax ...`) on a local task written by
leo_jax.eval.lmms_task from the synthetic validation questions: the same answer to every question and the same score
as `python -m leo_jax.eval`. lmms-eval is an optional dependency that CI does not install (it lives in its own venv:
README, "Scoring with lmms-eval"); without it the module is skipped."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("lmms_eval") is None:
    pytest.skip("lmms-eval is not installed in this environment (optional, not in requirements-test.txt); "
                "build its venv as README 'Scoring with lmms-eval' shows to run this test", allow_module_level=True)

from leo_jax.config import load_config
from leo_jax.data import synthetic
from leo_jax.eval import lmms_task
from leo_jax.eval.__main__ import main as eval_main
from train_helpers import save_step0_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_QUESTIONS = 8


@pytest.fixture(scope="module")
def model_and_questions(tmp_path_factory):
    """(training workdir of a tiny LEO-MINI step-0 state with LLM weights of std 0.5, so greedy answers vary;
    benchmark file where every other question's reference is replaced by the answer `python -m leo_jax.eval` gives,
    so the score is neither 0 nor 1 and both harnesses must agree question by question to match it)."""
    root = tmp_path_factory.mktemp("lmms")
    data_dir, workdir = str(root / "synthetic"), str(root / "run")
    synthetic.write_dataset(data_dir, 8, seed=0, val_num=NUM_QUESTIONS, multi_turn_fraction=0.0,
                            multi_image_fraction=0.0, text_only_fraction=0.0)
    config = load_config("tiny_leo_mini_train")
    config.data.update(train_files=os.path.join(data_dir, "data.json"), eval_files=os.path.join(data_dir, "val.json"))
    config.model.llm = {**config.model.llm, "initializer_range": 0.5}
    save_step0_checkpoint(config, workdir)
    assert eval_main(["--ckpt", workdir, "--data", os.path.join(data_dir, "val.jsonl"), "--out", str(root / "e0"),
                      "--batch-size", "4"]) == 0
    with open(root / "e0" / "predictions.jsonl") as f:
        predictions = [json.loads(line)["prediction"] for line in f]
    with open(os.path.join(data_dir, "val.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for index in range(0, len(records), 2):
        records[index]["answers"] = [predictions[index]]
    data = os.path.join(data_dir, "mixed.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return workdir, data, root


def test_lmms_eval_scores_as_leo_jax_eval(model_and_questions):
    workdir, data, root = model_and_questions
    assert eval_main(["--ckpt", workdir, "--data", data, "--out", str(root / "ours"), "--batch-size", "4"]) == 0
    with open(root / "ours" / "summary.json") as f:
        ours = json.load(f)
    with open(root / "ours" / "predictions.jsonl") as f:
        our_lines = [json.loads(line) for line in f]

    tasks = str(root / "tasks")
    lmms_task.write_task(data, tasks, "leo_synthetic")
    out = str(root / "lmms_out")
    # the user's command line, in a fresh process (the model is found through the package's lmms_eval.models entry
    # point, the task through --include_path)
    run = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "leo_jax", "--model_args", f"pretrained={workdir}",
         "--tasks", "leo_synthetic", "--include_path", tasks, "--batch_size", "4", "--log_samples",
         "--output_path", out],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    results = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f.endswith("_results.json")]
    samples = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files
               if f.endswith(".jsonl") and "samples_leo_synthetic" in f]
    assert len(results) == 1 and len(samples) == 1, (results, samples)
    with open(results[0]) as f:
        lmms_score = json.load(f)["results"]["leo_synthetic"]["score,none"]
    with open(samples[0]) as f:
        lmms_lines = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])

    # lmms-eval 0.7.3 logs a generate_until answer as a string (lm-eval: a one-element list)
    answers = [s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
               for s in lmms_lines]
    assert answers == [line["prediction"] for line in our_lines]
    assert [s["score"] for s in lmms_lines] == [line["score"] for line in our_lines]
    assert lmms_score == pytest.approx(ours["score"], abs=1e-12)
    assert 0.5 <= ours["score"] < 1.0 and len({line["prediction"] for line in our_lines}) > 1
