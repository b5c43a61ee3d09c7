"""The CoTR ablation harness and the prefill benchmark in quick mode: they run end to end and report what they
measured (the quick mode checks the harness, not the result; no timing is asserted)."""

import json
import os
import re
import subprocess
import sys

from leo_jax.data import synthetic
from leo_jax.experiments import cotr_ablation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_ablation_trains_variants_and_writes_the_table(tmp_path, capsys):
    """Two of the four variants (the paper's CoTR and no reduction) keep the test short; the model-level behaviour
    of all four is checked in test_cotr.py and test_export_leo_mini.py."""
    assert cotr_ablation.main(["--out", str(tmp_path), "--quick", "--variants", "cotr,keep_all"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "ablation.json").read_text())
    assert list(report["variants"]) == ["cotr", "keep_all"]
    assert report["quick"] and report["seeds"] == [0] and len(report["runs"]) == 2
    tokens = {name: row["visual_tokens_per_image"] for name, row in report["variants"].items()}
    assert tokens == {"cotr": 16, "keep_all": 64}
    flops = {name: row["forward_flops_per_sample"] for name, row in report["variants"].items()}
    assert flops["keep_all"] > flops["cotr"] > 0
    for name, row in report["variants"].items():
        assert set(row["accuracy"]) == set(synthetic.QUESTION_TYPES), name
        assert all(0.0 <= v["mean"] <= 1.0 and v["std"] == 0.0 for v in row["accuracy"].values()), name
        assert re.search(rf"^\| {name} +\| {tokens[name]} +\| [0-9.]+ +\|", printed, re.M), printed
    assert 0.0 < report["several_objects_fraction"]["color"] <= 1.0
    # a rerun reuses the finished runs (their result files), it does not train again
    before = {p: os.path.getmtime(p) for p in tmp_path.glob("runs/*/seed0/result.json")}
    assert len(before) == 2
    assert cotr_ablation.main(["--out", str(tmp_path), "--quick", "--variants", "keep_all"]) == 0
    assert {p: os.path.getmtime(p) for p in before} == before
    assert list(json.loads((tmp_path / "ablation.json").read_text())["variants"]) == ["keep_all"]


def test_ablation_rejects_unknown_variants(tmp_path, capsys):
    try:
        cotr_ablation.main(["--out", str(tmp_path), "--variants", "cotr,max_pool"])
    except SystemExit as e:
        assert e.code == 2
    assert "unknown ['max_pool']" in capsys.readouterr().err


def test_bench_prefill_quick_prints_its_figures():
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_prefill", "--quick"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "warm-up call excluded, median of 3 timed calls" in text
    assert re.search(r"LEO-style \(all tokens\) +64 visual tokens/image .*prefill +[0-9.]+ ms \(median; all: "
                     r"[0-9., ]+\) +decode +[0-9.]+ tokens/s +forward +[0-9.]+ GFLOPs/sample", text), text
    assert re.search(r"LEO-MINI \(CoTR\) +16 visual tokens/image", text), text
    assert re.search(r"ratio LEO-style / LEO-MINI: prefill latency [0-9.]+x, decode tokens/s [0-9.]+x, "
                     r"forward FLOPs \(summary\) [0-9.]+x", text), text


def test_an_interrupted_run_leaves_no_result(tmp_path, monkeypatch):
    """A run stopped before its last step (SIGTERM: the trainer saves and returns without evaluating) must not be
    cached as a result, or a rerun would report it instead of resuming it."""
    monkeypatch.setattr(cotr_ablation, "ensure_synthetic_data", lambda config, workdir: None)
    monkeypatch.setattr(cotr_ablation, "train", lambda config, workdir: {})
    try:
        cotr_ablation.run_one(cotr_ablation.VARIANTS[0], 0, 10, str(tmp_path), quick=True)
    except SystemExit as e:
        assert "stopped before step 10" in str(e.code) and "rerun the same command to resume" in str(e.code)
    else:
        raise AssertionError("an interrupted run was accepted")
    assert not list(tmp_path.glob("runs/*/seed0/result.json"))
