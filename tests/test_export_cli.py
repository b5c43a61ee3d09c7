"""`python -m leo_jax.convert export`: a training checkpoint -> the whole-model directory (+ components), read back
bit-identical by `load_hf` and loadable (strictly) by the package's PyTorch models; clear errors otherwise."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from leo_jax.config import load_config
from leo_jax.convert import load_hf
from leo_jax.convert.__main__ import main as convert_main
from leo_jax.models.registry import build_model
from leo_jax.sharding import build_mesh
from leo_jax.train.checkpoint import Checkpointer, load_trained
from leo_jax.train.state import create_train_state


def write_checkpoint(workdir, preset: str) -> None:
    """A step-0 training checkpoint of a freshly initialised preset (what the trainer writes, minus data state)."""
    config = load_config(preset)
    mesh = build_mesh(devices=jax.devices()[:1])
    _, state, _ = create_train_state(lambda rngs: build_model(config.model, rngs), nnx.Param, optax.adamw(1e-3), 0,
                                     mesh)
    checkpointer = Checkpointer(str(workdir / "checkpoints"), keep=1, async_save=False)
    checkpointer.save(0, state, None, config.to_dict())
    checkpointer.wait()
    checkpointer.close()


def flat_params(module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.mark.parametrize("preset, torch_model, components", [
    ("tiny_leo", "LeoModel", ("llm", "intern_vit", "sam")),
    ("tiny_leo_mini", "LeoMiniForCausalLM", ("llm", "vision_experts/clip", "vision_experts/convnext")),
])
def test_export_of_a_training_checkpoint_round_trips(tmp_path, capsys, preset, torch_model, components):
    import leo_jax.pytorch as leo_torch

    write_checkpoint(tmp_path / "run", preset)
    out = tmp_path / "export"
    assert convert_main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(out), "--components"]) == 0
    assert "wrote" in capsys.readouterr().out
    trained, _ = load_trained(str(tmp_path / "run"))
    expected, got = flat_params(trained), flat_params(load_hf(out))
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
    getattr(leo_torch, torch_model).from_pretrained(out)  # strict: every tensor has its place, none is missing
    for part in components:
        assert (out / "components" / part / "config.json").is_file(), part


def test_export_errors_name_the_problem(tmp_path, capsys):
    assert convert_main(["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"no checkpoints found in {tmp_path}" in capsys.readouterr().err
