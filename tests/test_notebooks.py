"""The Colab notebooks in notebooks/: stored without outputs, and each runs top to bottom in a fresh kernel (with a
small step budget through its `parameters` cell) with no error, showing its pictures.

    python tests/test_notebooks.py quickstart --out /tmp/executed   # run one by hand, keep the executed copy
"""

import argparse
import base64
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# Small budgets for CI, injected after each notebook's `parameters` cell; minimum images each must show.
CI_PARAMETERS = {
    "quickstart": ("STEPS = 40\nNUM_SAMPLES = 400", 6),
    "leo_tiles": ("", 5),
    "convert_and_scale": ("RUN_AOT = False  # minutes for a full-size preset; CI checks the rest", 0),
}


def notebook_names() -> list[str]:
    return sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


def execute(name: str, workdir: Path, timeout: int = 600):
    """Runs notebooks/NAME.ipynb in a fresh python3 kernel (cwd `workdir`, the repository on PYTHONPATH, one CPU
    device as on a Colab CPU runtime) with the CI parameters; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    source, _ = CI_PARAMETERS[name]
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = f"{source}\nWORKDIR = {str(workdir / 'run')!r}"
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel process inherits this environment
    try:
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb


def png_outputs(nb) -> list[bytes]:
    return [base64.b64decode(out["data"]["image/png"]) for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]


def test_every_notebook_has_ci_parameters_and_a_colab_badge():
    assert notebook_names() == sorted(CI_PARAMETERS)
    import nbformat
    for name in notebook_names():
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        assert f"/blob/main/notebooks/{name}.ipynb" in nb.cells[0].source, f"{name}: first cell needs its Colab badge"
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{name}: no 'parameters' cell"


def test_notebooks_are_stored_without_outputs():
    """Committed notebooks carry no outputs or execution counts (clear them: jupyter nbconvert --clear-output)."""
    import nbformat
    for name in notebook_names():
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"notebooks/{name}.ipynb cell {i} has stored outputs; clear them before committing "
                    "(jupyter nbconvert --clear-output --inplace notebooks/*.ipynb)")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CI_PARAMETERS))
def test_notebook_runs_top_to_bottom(name, tmp_path):
    started = time.perf_counter()
    nb = execute(name, tmp_path)
    images = png_outputs(nb)
    print(f"notebooks/{name}.ipynb: {time.perf_counter() - started:.0f} s, {len(images)} images")
    assert len(images) >= CI_PARAMETERS[name][1]
    assert all(image.startswith(b"\x89PNG") for image in images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Execute a notebook as CI does and keep the executed copy and its "
                                                 "pictures.")
    parser.add_argument("name", choices=sorted(CI_PARAMETERS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import nbformat
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    nb = execute(args.name, out)
    nbformat.write(nb, out / f"{args.name}.ipynb")
    for i, image in enumerate(png_outputs(nb)):
        (out / f"{args.name}_{i:02d}.png").write_bytes(image)
    print(f"{args.name}: {time.perf_counter() - started:.0f} s; executed copy and PNGs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
