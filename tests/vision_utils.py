"""Shared checks for the vision-encoder tests: saving tiny random transformers models, torch <-> NHWC pixels,
HF -> leo_jax -> HF round trips, and parameter counts of presets vs transformers models on the meta device."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import torch
from flax import nnx
from safetensors import safe_open

from leo_jax import convert
from leo_jax.config import load_config
from leo_jax.models import registry


def perturb_and_save(model: torch.nn.Module, out: Path, seed: int = 0) -> torch.nn.Module:
    """Makes norms, biases, layer scales and zero-initialised embeddings non-trivial (so their mapping is tested),
    then writes the model with save_pretrained. Returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.eval().save_pretrained(out)
    return model


def load_with(hf_dir: Path, **changes) -> nnx.Module:
    """`convert.load_hf` in fp32 with config fields replaced (those read at call time: output_layer, ...)."""
    import dataclasses

    module = convert.load_hf(hf_dir, dtype="float32")
    if changes:
        module.cfg = dataclasses.replace(module.cfg, **changes)
    return module


def random_pixels(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Normalised-looking float pixels, NHWC."""
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)


def to_torch(pixels_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels_nhwc).permute(0, 3, 1, 2).contiguous()


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def read_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(file, framework="np") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_round_trip(hf_dir: Path, work: Path, fields: tuple[str, ...]) -> None:
    """HF dir -> leo_jax checkpoint -> HF dir: every tensor bit-identical (same names, dtypes, shapes, bytes) and
    the config fields that define the architecture equal."""
    ckpt = convert.import_hf(hf_dir, work / "leo")
    back = convert.export_hf(ckpt, work / "back")
    original, exported = read_tensors(hf_dir), read_tensors(back)
    assert sorted(original) == sorted(exported)
    for name, array in original.items():
        assert exported[name].dtype == array.dtype and exported[name].shape == array.shape, name
        assert exported[name].tobytes() == array.tobytes(), f"{name} differs after the round trip"
    cfg_a = json.loads((hf_dir / "config.json").read_text())
    cfg_b = json.loads((back / "config.json").read_text())
    for field in fields + ("model_type",):
        assert cfg_a.get(field) == cfg_b.get(field), (field, cfg_a.get(field), cfg_b.get(field))


def assert_tower_round_trip(full_dir: Path, work: Path, tower_prefix: str, vision_cls, pixels: np.ndarray,
                            reference: np.ndarray) -> None:
    """A full checkpoint (CLIPModel, SiglipModel, SamModel): its vision tower imported -> exported is bit-identical
    to the tower's tensors (nothing else is written), the exported directory loads with transformers'
    `vision_cls.from_pretrained` and gives `reference` (the full model's vision output) for `pixels`."""
    ckpt = convert.import_hf(full_dir, work / "leo")
    back = convert.export_hf(ckpt, work / "back")
    original = {k: v for k, v in read_tensors(full_dir).items() if k.startswith(tower_prefix)}
    exported = read_tensors(back)
    assert sorted(exported) == sorted(original)
    for name, array in original.items():
        assert exported[name].dtype == array.dtype and exported[name].tobytes() == array.tobytes(), name
    cfg_a = json.loads((full_dir / "config.json").read_text())
    cfg_b = json.loads((back / "config.json").read_text())
    assert cfg_a["model_type"] == cfg_b["model_type"] and cfg_a["vision_config"] == cfg_b["vision_config"]
    with torch.no_grad():
        out = vision_cls.from_pretrained(back).eval()(to_torch(pixels)).last_hidden_state.numpy()
    assert max_abs_diff(out, reference) == 0.0


def preset_param_count(preset: str, arg: str | None = None) -> int:
    """Parameters of leo_jax/configs/<preset>.py (get_config(arg)) counted abstractly (nothing allocated)."""
    model = registry.abstract_model(load_config(preset, arg=arg).model)
    return sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def preset_output(preset: str, pixels_shape: tuple[int, ...], overrides: tuple[str, ...] = ()):
    """The output ShapeDtypeStruct of leo_jax/configs/<preset>.py's model on bfloat16 pixels, traced abstractly (full
    size, nothing allocated or compiled)."""
    import jax.numpy as jnp

    graphdef, state = nnx.split(registry.abstract_model(load_config(preset, overrides).model))
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                          jax.ShapeDtypeStruct(pixels_shape, jnp.bfloat16))


def meta_param_count(model_cls, config) -> int:
    """Parameters of a transformers model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


def jit_call(module: nnx.Module, *args):
    """module(*args) under one jax.jit (faster than op-by-op for the bigger tiny models)."""
    graphdef, state = nnx.split(module)
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)


def assert_bf16_close(hf_dir: Path, pixels: np.ndarray, rel_tol: float = 0.03) -> None:
    """The bfloat16-compute model returns bfloat16 values within `rel_tol` (of the output's scale) of fp32."""
    import jax.numpy as jnp

    reference = np.asarray(jit_call(convert.load_hf(hf_dir, dtype="float32"), pixels))
    out = jit_call(convert.load_hf(hf_dir, dtype="bfloat16"), jnp.asarray(pixels, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert max_abs_diff(out.astype(np.float32), reference) <= rel_tol * np.max(np.abs(reference))
