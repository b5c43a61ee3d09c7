"""ConvNeXt vs transformers ConvNextModel: stage maps, conversion round trip, sharding, drop-path, preset size."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from leo_jax import convert
from leo_jax.config import load_config
from leo_jax.convert.core import ConversionError
from leo_jax.models.vision.convnext import ConvNext, ConvNextBlock, ConvNextConfig
from tests.sharding_utils import assert_sharded_matches
from tests.vision_utils import (
    assert_round_trip,
    max_abs_diff,
    meta_param_count,
    perturb_and_save,
    preset_param_count,
    random_pixels,
    read_tensors,
    to_torch,
)

TINY = dict(hidden_sizes=[16, 32, 48, 64], depths=[2, 1, 2, 1], num_stages=4, layer_scale_init_value=0.5,
            drop_path_rate=0.2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import ConvNextConfig as HFConfig
    from transformers import ConvNextModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("convnext_hf")
    return path, perturb_and_save(ConvNextModel(HFConfig(**TINY)), path)


def test_stage_maps_match_transformers(hf_dir):
    path, torch_model = hf_dir
    pixels = random_pixels(2, 72, 100)  # non-square, not a multiple of 32: each stage floors like torch
    with torch.no_grad():
        ref = torch_model(to_torch(pixels), output_hidden_states=True)
    model = convert.load_hf(path)
    last = model(jnp.asarray(pixels))
    stages = model(jnp.asarray(pixels), return_stages=True)
    want = ref.last_hidden_state.permute(0, 2, 3, 1).numpy()
    diff = max_abs_diff(last, want)
    print(f"convnext last_hidden_state max abs diff {diff:.2e}")
    assert last.shape == (2, 2, 3, 64) and diff <= 1e-4
    assert len(stages) == 4
    for got, ref_stage in zip(stages, ref.hidden_states[1:]):
        np.testing.assert_allclose(np.asarray(got), ref_stage.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(model.pooled(last)), ref.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_output_stage_selects_an_earlier_map(hf_dir):
    path, _ = hf_dir
    model = convert.load_hf(path)
    pixels = jnp.asarray(random_pixels(1, 64, 64, seed=1))
    stages = model(pixels, return_stages=True)
    model.cfg = dataclasses.replace(model.cfg, output_stage=1)
    np.testing.assert_array_equal(np.asarray(model(pixels)), np.asarray(stages[1]))


def test_round_trip_is_bit_identical(hf_dir, tmp_path):
    assert_round_trip(hf_dir[0], tmp_path, ("hidden_sizes", "depths", "num_stages", "patch_size", "hidden_act",
                                            "layer_scale_init_value", "layer_norm_eps", "drop_path_rate", "image_size",
                                            "architectures"))


def test_image_classification_checkpoint_gives_its_backbone(tmp_path):
    """facebook/convnext-* files are ConvNextForImageClassification: the backbone under 'convnext.' is read (the
    classifier skipped), matches torch, and its tensors export bit-identically under their names."""
    from transformers import ConvNextConfig as HFConfig
    from transformers import ConvNextForImageClassification

    torch.manual_seed(1)
    torch_model = perturb_and_save(ConvNextForImageClassification(HFConfig(**TINY, num_labels=5)), tmp_path / "cls")
    pixels = random_pixels(1, 64, 32)
    with torch.no_grad():
        want = torch_model.convnext(to_torch(pixels)).last_hidden_state.permute(0, 2, 3, 1).numpy()
    assert max_abs_diff(convert.load_hf(tmp_path / "cls")(jnp.asarray(pixels)), want) <= 1e-4
    convert.import_hf(tmp_path / "cls", tmp_path / "leo")
    back = read_tensors(convert.export_hf(tmp_path / "leo", tmp_path / "back"))
    original = {k: v for k, v in read_tensors(tmp_path / "cls").items() if k.startswith("convnext.")}
    assert sorted(back) == sorted(original)
    assert all(back[k].tobytes() == original[k].tobytes() for k in original)


def test_sharded_forward_matches_single_device():
    cfg = ConvNextConfig(hidden_sizes=(16, 32, 48, 64), depths=(1, 2, 1, 1), dtype="float32",
                         layer_scale_init_value=0.5)
    model = ConvNext(cfg, rngs=nnx.Rngs(0))
    pixels = jax.random.normal(jax.random.key(1), (8, 32, 64, 3))
    worst = assert_sharded_matches(model, lambda m, x: m(x, return_stages=True), (pixels,))
    print(f"convnext sharded vs single-device max abs diff {worst:.2e}")


def test_drop_path_keeps_or_drops_each_sample_whole():
    cfg = ConvNextConfig(hidden_sizes=(16,), depths=(1,), dtype="float32", layer_scale_init_value=1.0)
    block = ConvNextBlock(cfg, 16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (64, 4, 4, 16))
    branch = block(x) - x
    out = block(x, (jnp.float32(0.5), jax.random.key(3)))
    kept = np.array([np.allclose(out[i], x[i] + 2 * branch[i], atol=1e-5) for i in range(64)])
    dropped = np.array([np.allclose(out[i], x[i]) for i in range(64)])
    assert np.all(kept ^ dropped) and 10 < kept.sum() < 54


def test_drop_path_in_training_mode(hf_dir):
    path, _ = hf_dir
    model = convert.load_hf(path)
    pixels = jnp.asarray(random_pixels(4, 32, 32, seed=2))
    with pytest.raises(ValueError, match="needs an `rng`"):
        model(pixels, deterministic=False)
    train_a = model(pixels, deterministic=False, rng=jax.random.key(0))
    train_b = model(pixels, deterministic=False, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(train_a), np.asarray(train_b))
    assert not np.allclose(np.asarray(train_a), np.asarray(model(pixels)))


def test_bad_inputs_give_clear_errors(hf_dir, tmp_path):
    path, _ = hf_dir
    model = convert.load_hf(path)
    with pytest.raises(ValueError, match="smaller than the total stride 32"):
        model(jnp.zeros((1, 24, 64, 3)))
    with pytest.raises(ValueError, match=r"NHWC pixels \[B, H, W, 3\]"):
        model(jnp.zeros((1, 3, 64, 64)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    del tensors["encoder.stages.2.layers.1.pwconv1.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ConversionError, match=r"encoder\.stages\.2\.layers\.1\.pwconv1\.weight"):
        convert.load_hf(broken)
    with pytest.raises(ValueError, match="config.model.output_stage=4 is out of range"):
        ConvNextConfig(output_stage=4)


def test_large_preset_matches_transformers_parameter_count():
    from transformers import ConvNextConfig as HFConfig
    from transformers import ConvNextModel

    arch = load_config("convnext_large").model
    ref = meta_param_count(ConvNextModel, HFConfig(hidden_sizes=list(arch.hidden_sizes), depths=list(arch.depths),
                                                   layer_scale_init_value=arch.layer_scale_init_value))
    assert preset_param_count("convnext_large") == ref == 196_230_336


def test_forward_flops_match_xla_count_and_the_paper():
    """One block per stage (XLA counts a scanned body once): within 12% of XLA's count, which adds elementwise ops
    (LayerNorm, GELU on the 4x-wide hidden) and skips the zero-padded taps of the 7x7 depthwise convs; the Large
    preset gives the paper's 34.4 GMACs at 224 px and a 7x7 last map."""
    cfg = ConvNextConfig(hidden_sizes=(64, 128, 256, 512), depths=(1, 1, 1, 1), image_size=128, dtype="float32")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ConvNext(cfg, rngs=nnx.Rngs(0))))
    xla = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(
        state, jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32)).cost_analysis()["flops"]
    assert abs(xla / cfg.forward_flops() - 1) < 0.12
    large = ConvNextConfig.from_config({k: v for k, v in load_config("convnext_large").model.items() if k != "kind"})
    assert round(large.forward_flops() / 2e9, 1) == 34.4 and large.visual_tokens_per_image() == 49
