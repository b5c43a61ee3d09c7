"""InternViT vs transformers InternVLVisionModel (tiny, fp32) in both checkpoint layouts (HF and the original
OpenGVLab fused-qkv layout built from the same weights): parity on a non-square input, penultimate layer, bit-exact
round trips, sharded forward, drop path (+ remat), bfloat16 compute, errors, preset size and full-size trace."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import InternVLVisionConfig as HFConfig
from transformers import InternVLVisionModel

from leo_jax import convert
from leo_jax.convert.core import ConversionError
from leo_jax.models.vision.vit import drop_path
from tests.sharding_utils import assert_sharded_matches
from tests.vision_utils import (
    assert_bf16_close,
    assert_round_trip,
    load_with,
    max_abs_diff,
    meta_param_count,
    perturb_and_save,
    preset_output,
    preset_param_count,
    random_pixels,
    to_torch,
)

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
            patch_size=7, attention_bias=True, layer_norm_eps=1e-6)
HF_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
             "patch_size", "hidden_act", "layer_norm_eps", "attention_bias", "layer_scale_init_value")


def original_from_hf(model: InternVLVisionModel, out):
    """Writes the OpenGVLab layout (model_type intern_vit_6b) holding the same weights as an InternVLVisionModel,
    so the transformers model is the PyTorch reference for it."""
    cfg, sd = model.config, model.state_dict()
    new = {"embeddings.class_embedding": sd["embeddings.cls_token"],
           "embeddings.position_embedding": sd["embeddings.position_embeddings"],
           "embeddings.patch_embedding.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "embeddings.patch_embedding.bias": sd["embeddings.patch_embeddings.projection.bias"]}
    for i in range(cfg.num_hidden_layers):
        a, b = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        new[b + "attn.qkv.weight"] = torch.cat([sd[a + f"attention.{n}_proj.weight"] for n in "qkv"])
        new[b + "attn.qkv.bias"] = torch.cat([sd[a + f"attention.{n}_proj.bias"] for n in "qkv"])
        for theirs, ours in (("attention.projection_layer", "attn.proj"), ("layernorm_before", "norm1"),
                             ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            new[b + ours + ".weight"], new[b + ours + ".bias"] = sd[a + theirs + ".weight"], sd[a + theirs + ".bias"]
        new[b + "ls1"], new[b + "ls2"] = sd[a + "lambda_1"], sd[a + "lambda_2"]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in new.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
              "num_attention_heads": cfg.num_attention_heads, "patch_size": cfg.patch_size[0],
              "image_size": cfg.image_size[0], "num_channels": 3, "qkv_bias": True, "qk_normalization": False,
              "norm_type": "layer_norm", "layer_norm_eps": cfg.layer_norm_eps, "hidden_act": "gelu",
              "drop_path_rate": 0.1, "dropout": 0.0, "attention_dropout": 0.0, "initializer_factor": 1.0,
              "use_flash_attn": True, "torch_dtype": "float32",
              "auto_map": {"AutoConfig": "configuration_intern_vit.InternVisionConfig",
                           "AutoModel": "modeling_intern_vit.InternVisionModel"}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("intern_vit")
    torch.manual_seed(0)
    model = perturb_and_save(InternVLVisionModel(HFConfig(**TINY)), root / "hf")
    return root / "hf", original_from_hf(model, root / "original"), model


def test_parity_non_square_both_layouts(hf):
    hf_dir, original_dir, model = hf
    pixels = random_pixels(2, 28, 42)  # 4x6 patches: the 4x4 position grid is resized bicubically
    with torch.no_grad():
        ref = model(to_torch(pixels), output_hidden_states=True)
    for layout, path in (("HF", hf_dir), ("original", original_dir)):
        out = load_with(path)(pixels)
        diff = max_abs_diff(out, ref.last_hidden_state.numpy())
        print(f"InternViT ({layout} layout) last_hidden_state 28x42 max abs diff {diff:.2e}")
        assert out.shape == (2, 1 + 4 * 6, 32) and diff <= 1e-4
    assert load_with(original_dir).cfg.drop_path_rate == 0.1  # read from the original config.json
    diff = max_abs_diff(load_with(hf_dir, output_layer=-2)(pixels), ref.hidden_states[-2].numpy())
    assert diff <= 1e-4, diff


def test_parity_native_size(hf):
    pixels = random_pixels(1, 28, 28, seed=3)
    with torch.no_grad():
        ref = hf[2](to_torch(pixels)).last_hidden_state.numpy()
    assert max_abs_diff(load_with(hf[0])(pixels), ref) <= 1e-4


def test_round_trip_hf_layout(hf, tmp_path):
    assert_round_trip(hf[0], tmp_path, HF_FIELDS)


def test_round_trip_hf_layout_without_qkv_bias(tmp_path):
    torch.manual_seed(1)
    perturb_and_save(InternVLVisionModel(HFConfig(**{**TINY, "attention_bias": False})), tmp_path / "hf")
    assert_round_trip(tmp_path / "hf", tmp_path, HF_FIELDS)


def test_round_trip_original_layout(hf, tmp_path):
    assert_round_trip(hf[1], tmp_path, ("hidden_size", "num_hidden_layers", "qkv_bias", "image_size", "patch_size",
                                        "drop_path_rate", "initializer_factor", "auto_map", "architectures"))


def test_sharded_forward_matches_single_device(hf):
    worst = assert_sharded_matches(load_with(hf[0]), lambda m, x: m(x), (random_pixels(8, 28, 35, seed=2),), atol=1e-5)
    print(f"InternViT sharded vs single device max abs diff {worst:.2e}")


def test_drop_path_is_per_sample_and_unbiased():
    x = jax.numpy.ones((4000, 3, 2))
    out = np.asarray(drop_path(x, jax.numpy.float32(0.25), jax.random.key(0)))
    per_sample = out.reshape(4000, -1)
    assert np.all((per_sample == 0).all(1) | np.isclose(per_sample, 1 / 0.75).all(1))  # whole samples dropped
    assert abs((per_sample[:, 0] > 0).mean() - 0.75) < 0.03
    assert abs(out.mean() - 1.0) < 0.04


def test_drop_path_only_with_rng(hf):
    module = load_with(hf[0], drop_path_rate=0.5)
    pixels = random_pixels(8, 28, 28, seed=4)
    deterministic = np.asarray(module(pixels))
    with torch.no_grad():
        assert max_abs_diff(deterministic, hf[2](to_torch(pixels)).last_hidden_state.numpy()) <= 1e-4
    a, b = module(pixels, rng=jax.random.key(1)), module(pixels, rng=jax.random.key(1))
    assert np.array_equal(a, b) and max_abs_diff(a, deterministic) > 1e-3
    grads = jax.grad(lambda p: module(p, rng=jax.random.key(2)).sum())(pixels)  # trainable through the scan
    assert np.isfinite(np.asarray(grads)).all()
    module.cfg = dataclasses.replace(module.cfg, remat_policy="full")  # rematerialised: same gradients
    remat_grads = jax.grad(lambda p: module(p, rng=jax.random.key(2)).sum())(pixels)
    assert max_abs_diff(remat_grads, grads) <= 1e-5


def test_unsupported_options_are_clear_errors(tmp_path):
    torch.manual_seed(0)
    perturb_and_save(InternVLVisionModel(HFConfig(**{**TINY, "use_qk_norm": True})), tmp_path)
    with pytest.raises(ConversionError, match="use_qk_norm=True is not supported"):
        convert.load_hf(tmp_path)


def test_missing_tensor_is_named(hf, tmp_path):
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file as save_np

    (tmp_path / "config.json").write_text((hf[1] / "config.json").read_text())
    tensors = load_file(hf[1] / "model.safetensors")
    del tensors["encoder.layers.2.attn.qkv.bias"]
    save_np(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ConversionError, match=r"encoder\.layers\.2\.attn\.qkv\.bias"):
        convert.load_hf(tmp_path)


def test_preset_parameter_count_matches_transformers():
    ours = preset_param_count("intern_vit_300m")
    # OpenGVLab/InternViT-300M-448px as transformers InternVLVisionConfig (vision_config of InternVL3-1B-hf)
    theirs = meta_param_count(InternVLVisionModel, HFConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=[448, 448],
        patch_size=[14, 14], attention_bias=True, use_qk_norm=False, use_mean_pooling=True, norm_type="layer_norm"))
    print(f"InternViT-300M-448px: {ours} parameters")
    assert ours == theirs == 304_012_288


def test_bfloat16_compute(hf):
    assert_bf16_close(hf[0], random_pixels(2, 28, 35, seed=5))


def test_full_size_preset_traces():
    out = preset_output("intern_vit_300m", (2, 448, 448, 3))
    assert out.shape == (2, 1 + 32 * 32, 1024) and out.dtype == jnp.bfloat16
