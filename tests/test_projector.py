"""Pixel unshuffle (both orderings) and the MLP projectors against the PyTorch operations / modules they replace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from leo_jax.models.projector import (
    MLPProjector,
    ProjectorConfig,
    pixel_unshuffle_internvl,
    pixel_unshuffle_torch,
    torch_projector_names,
)
from leo_jax.pytorch import LeoProjector, MiniProjector, pixel_shuffle_internvl, pixel_unshuffle_tokens


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _random(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(2, 8, 8, 5), (1, 4, 6, 3)])
def test_internvl_v2_ordering_equals_internvl_pixel_shuffle(shape):
    x = _random(shape)
    ours = pixel_unshuffle_internvl(jnp.asarray(x), 0.5)
    theirs = pixel_shuffle_internvl(torch.from_numpy(x), 0.5).numpy()
    assert ours.shape == theirs.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3] * 4)
    np.testing.assert_array_equal(np.asarray(ours), theirs)  # a pure permutation: bit-exact


@pytest.mark.parametrize("factor, shape", [(2, (2, 8, 12, 3)), (4, (1, 8, 16, 5))])
def test_torch_ordering_equals_torch_pixel_unshuffle(factor, shape):
    x = _random(shape, seed=1)
    ours = pixel_unshuffle_torch(jnp.asarray(x), factor)
    theirs = F.pixel_unshuffle(torch.from_numpy(x).permute(0, 3, 1, 2), factor).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_the_two_orderings_differ():
    """Guards against a mix-up of the two: on channels > 1 they are different permutations."""
    x = jnp.asarray(_random((1, 4, 4, 3), seed=2))
    assert not np.array_equal(pixel_unshuffle_internvl(x, 0.5), pixel_unshuffle_torch(x, 2))


def test_leo_token_counts_at_full_size():
    """LEO: InternViT 32x32x1024 -> 256 tokens x 4096; SAM neck 64x64x256 -> pixel_unshuffle(4) -> 16x16x4096,
    both equal to the torch code paths on the full-size maps (row-major tokens)."""
    vit = _random((1, 32, 32, 1024), seed=3)
    tokens = pixel_unshuffle_internvl(jnp.asarray(vit), 0.5).reshape(1, -1, 4096)
    assert tokens.shape == (1, 256, 4096)
    expected = pixel_shuffle_internvl(torch.from_numpy(vit), 0.5).reshape(1, -1, 4096).numpy()
    np.testing.assert_array_equal(np.asarray(tokens), expected)

    sam = _random((1, 64, 64, 256), seed=4)
    grid = pixel_unshuffle_torch(jnp.asarray(sam), 4)
    assert grid.shape == (1, 16, 16, 4096)
    expected = pixel_unshuffle_tokens(torch.from_numpy(sam).permute(0, 3, 1, 2), 4).numpy()
    assert expected.shape == (1, 256, 4096)
    np.testing.assert_array_equal(np.asarray(grid).reshape(1, 256, 4096), expected)


def test_bad_pixel_unshuffle_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="divisible by 2"):
        pixel_unshuffle_internvl(jnp.zeros((1, 5, 4, 2)), 0.5)
    with pytest.raises(ValueError, match="scale=0.3 must be 1/r"):
        pixel_unshuffle_internvl(jnp.zeros((1, 4, 4, 2)), 0.3)
    with pytest.raises(ValueError, match="divisible by 4"):
        pixel_unshuffle_torch(jnp.zeros((1, 8, 6, 2)), 4)


def _load_into_torch(module: MLPProjector, torch_module: torch.nn.Module) -> None:
    """Copies leo_jax projector weights into the torch nn.Sequential by `torch_projector_names`."""
    names = torch_projector_names(module.cfg.layer_norm)
    state = {}
    for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        prefix, leaf = ".".join(map(str, path[:-1])), path[-1]
        value = np.array(variable.get_value())
        state[f"{names[prefix]}.{'bias' if leaf == 'bias' else 'weight'}"] = torch.from_numpy(
            value.T.copy() if leaf == "kernel" else value)
    torch_module.load_state_dict(state, strict=True)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_projectors_equal_torch_modules(layer_norm):
    cfg = ProjectorConfig(in_features=24, out_features=16, layer_norm=layer_norm, dtype="float32")
    module = MLPProjector(cfg, rngs=nnx.Rngs(0))
    # non-trivial LayerNorm affine and biases, so their mapping is tested
    for i, (path, variable) in enumerate(nnx.to_flat_state(nnx.state(module, nnx.Param))):
        variable.set_value(variable.get_value() + 0.3 * jnp.asarray(_random(variable.shape, seed=10 + i)))
    reference = LeoProjector(24, 16) if layer_norm else MiniProjector(24, 16)
    _load_into_torch(module, reference)
    x = _random((2, 5, 24), seed=5) * 3 + 1
    ours = jax.jit(lambda m, v: m(v))(module, jnp.asarray(x))
    with torch.no_grad():
        theirs = reference(torch.from_numpy(x)).numpy()
    diff = _max_diff(ours, theirs)
    print(f"projector layer_norm={layer_norm}: max abs diff vs torch {diff:.2e}")
    assert ours.shape == (2, 5, 16) and diff <= 1e-5


def test_projector_params_carry_logical_axes_and_config_errors_are_clear():
    module = MLPProjector(ProjectorConfig(in_features=8, out_features=4), rngs=nnx.Rngs(0))
    axes = {path: v.get_metadata()["axes"] for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    assert axes[("norm", "scale")] == ("norm",)
    assert axes[("mlp", "fc1", "kernel")] == ("embed", "mlp") and axes[("mlp", "fc2", "kernel")] == ("mlp", "embed")
    with pytest.raises(ValueError, match=r"config.projector: unknown field\(s\) \['width'\]"):
        ProjectorConfig.from_config({"in_features": 8, "out_features": 4, "width": 3})
    with pytest.raises(ValueError, match="config.projector.act='swish'"):
        ProjectorConfig(in_features=8, out_features=4, act="swish")
