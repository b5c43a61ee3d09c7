"""The package as users get it: `pip install .` (offline, into a temporary target) with its presets, package data and
console scripts; and the import-layer contracts that CI checks, shown to catch a deliberate violation."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("leo-train", "leo-convert", "leo-generate", "leo-eval", "leo-summary")


def _run(cmd, cwd, env=None, timeout=600):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_pip_install_then_commands_from_another_directory(tmp_path):
    """The installed copy (not the checkout) serves presets by name, the synthetic tokenizer and console scripts."""
    source, target = tmp_path / "source", tmp_path / "site"  # a copy: setuptools builds in the source tree
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "*venv", "build", "*.egg-info", "__pycache__"))
    pip = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                "--target", str(target), str(source)], cwd=tmp_path)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    assert (target / "leo_jax" / "configs" / "tiny_leo_mini_train.py").is_file()
    assert (target / "leo_jax" / "data" / "assets" / "synthetic_tokenizer.json").is_file()
    assert not (target / "tests").exists() and not (target / "configs").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    where = _run([sys.executable, "-c", "import leo_jax.configs, leo_jax.data.tokenizer as t; "
                  "print(leo_jax.configs.__file__); print(t.SYNTHETIC_TOKENIZER_PATH)"], elsewhere, env)
    assert where.returncode == 0, where.stderr[-3000:]
    assert all(line.startswith(str(target)) for line in where.stdout.split()), where.stdout

    train_help = _run([sys.executable, "-m", "leo_jax.train", "--config", "tiny_leo_mini_train", "--help"], elsewhere,
                      env)
    assert train_help.returncode == 0 and "--workdir" in train_help.stdout, train_help.stderr[-3000:]
    summary = _run([str(target / "bin" / "leo-summary"), "--config", "llama3_8b"], elsewhere, env)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "8,030,261,248" in summary.stdout, summary.stdout
    for script in SCRIPTS:
        result = _run([str(target / "bin" / script), "--help"], elsewhere, env)
        assert result.returncode == 0 and "usage" in result.stdout.lower(), (script, result.stderr[-2000:])


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter with the repository's contracts on the package copy under `root`."""
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return _run([sys.executable, "-c", code, "--no-cache"], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                timeout=300)


def test_import_contracts_report_a_deliberate_violation(tmp_path):
    """A model module importing the trainer and a pytorch/ module importing jax are both reported, by file."""
    shutil.copytree(REPO / "leo_jax", tmp_path / "leo_jax", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "leo_jax" / "models" / "bad_layering.py").write_text("from leo_jax.train import loop  # noqa\n")
    (tmp_path / "leo_jax" / "pytorch" / "bad_jax.py").write_text("import jax.numpy  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "leo_jax.models is not allowed to import leo_jax.train" in result.stdout, result.stdout
    assert "leo_jax.models.bad_layering -> leo_jax.train" in result.stdout, result.stdout
    assert "leo_jax.pytorch is not allowed to import jax" in result.stdout, result.stdout
    assert "leo_jax.pytorch.bad_jax -> jax" in result.stdout, result.stdout
