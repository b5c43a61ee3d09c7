"""Import layers: layers < models < {data, convert, checkpoints} < scoring < {train, infer} < {eval, CLIs}.

Each check imports modules in a fresh interpreter and lists the leo_jax packages that ended up in `sys.modules`
(module-level imports, followed transitively), and scans the same files' own source for imports inside functions
(the CLIs import lazily so that `--help` stays fast)."""

import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loaded_after_import(modules: list[str]) -> list[str]:
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('leo_jax'))))\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _package_files(*packages: str) -> list[str]:
    files = []
    for package in packages:
        path = os.path.join(ROOT, *package.split("."))
        if os.path.isfile(path + ".py"):
            files.append(path + ".py")
        for directory, _, names in os.walk(path):
            files += [os.path.join(directory, n) for n in names if n.endswith(".py")]
    return files


def _imports_in_source(path: str) -> set[str]:
    """Every module named by an import statement anywhere in the file (functions included)."""
    tree = ast.parse(open(path).read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _offenders(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in _package_files(*packages):
        bad = sorted(n for n in _imports_in_source(path) if n.startswith(forbidden))
        if bad:
            found[os.path.relpath(path, ROOT)] = bad
    return found


MODEL_MODULES = ["leo_jax.models.leo", "leo_jax.models.leo_mini", "leo_jax.models.llm.decoder",
                 "leo_jax.models.vision.pix2struct", "leo_jax.models.vision.eva02", "leo_jax.models.vision.siglip",
                 "leo_jax.models.vision.convnext", "leo_jax.models.registry", "leo_jax.layers.pixels"]
ABOVE_MODELS = ("leo_jax.data", "leo_jax.convert", "leo_jax.checkpoints", "leo_jax.train", "leo_jax.infer",
                "leo_jax.eval")


def test_models_and_layers_import_nothing_above_them():
    loaded = _loaded_after_import(MODEL_MODULES)
    assert [m for m in loaded if m.startswith(ABOVE_MODELS)] == []
    assert _offenders(("leo_jax.models", "leo_jax.layers"), ABOVE_MODELS) == {}


BELOW_TRAIN = ("leo_jax.train",)


@pytest.mark.parametrize("modules, packages, forbidden", [
    (["leo_jax.checkpoints"], ("leo_jax.checkpoints",), BELOW_TRAIN + ("leo_jax.convert", "leo_jax.infer",
                                                                      "leo_jax.eval")),
    (["leo_jax.convert.__main__"] + [f"leo_jax.convert.{n[:-3]}" for n in sorted(os.listdir(
        os.path.join(ROOT, "leo_jax", "convert"))) if n.endswith(".py") and n != "__main__.py"], ("leo_jax.convert",),
     BELOW_TRAIN),
    (["leo_jax.generate", "leo_jax.infer.chat"], ("leo_jax.generate", "leo_jax.infer"), BELOW_TRAIN),
    (["leo_jax.eval.__main__", "leo_jax.eval.benchmark"], ("leo_jax.eval",), BELOW_TRAIN),
], ids=["checkpoints", "convert", "generate", "eval"])
def test_checkpoint_readers_do_not_import_the_trainer(modules, packages, forbidden):
    """generate, eval and convert read checkpoints through leo_jax.checkpoints, which sits below convert."""
    loaded = _loaded_after_import(modules)
    assert [m for m in loaded if m.startswith(forbidden)] == []
    assert _offenders(packages, forbidden) == {}
