"""CLIP ViT vs transformers CLIPVisionModel (tiny, fp32): parity on a non-square input (interpolated positions),
penultimate-layer and pooled outputs, bit-exact round trip, the vision tower of a full CLIPModel checkpoint,
sharded forward, bfloat16 compute, errors, preset size and full-size trace."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel
from transformers import CLIPVisionConfig as HFConfig

from leo_jax import convert
from leo_jax.convert.core import ConversionError
from tests.sharding_utils import assert_sharded_matches
from tests.vision_utils import (
    assert_bf16_close,
    assert_round_trip,
    assert_tower_round_trip,
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
            patch_size=7, layer_norm_eps=1e-5)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_hf")
    torch.manual_seed(0)
    model = perturb_and_save(CLIPVisionModel(HFConfig(**TINY)), path)
    return path, model


def test_parity_non_square_with_interpolated_positions(hf):
    path, model = hf
    pixels = random_pixels(2, 28, 42)  # 4x6 patches: the 4x4 position grid is resized bicubically
    with torch.no_grad():
        ref = model(to_torch(pixels), interpolate_pos_encoding=True, output_hidden_states=True)
    module = load_with(path, interpolate_pos_encoding=True)
    out = np.asarray(module(pixels))
    diff = max_abs_diff(out, ref.last_hidden_state.numpy())
    print(f"CLIP last_hidden_state 28x42 max abs diff {diff:.2e}")
    assert out.shape == (2, 1 + 4 * 6, 32) and diff <= 1e-4
    pooled = max_abs_diff(module.pooled(out), ref.pooler_output.numpy())
    assert pooled <= 1e-4, pooled
    penultimate = load_with(path, interpolate_pos_encoding=True, output_layer=-2)
    diff2 = max_abs_diff(penultimate(pixels), ref.hidden_states[-2].numpy())
    print(f"CLIP hidden_states[-2] max abs diff {diff2:.2e}")
    assert diff2 <= 1e-4


def test_parity_native_size(hf):
    path, model = hf
    pixels = random_pixels(2, 28, 28, seed=1)
    with torch.no_grad():
        ref = model(to_torch(pixels)).last_hidden_state.numpy()
    assert max_abs_diff(load_with(path)(pixels), ref) <= 1e-4


def test_round_trip_bit_identical(hf, tmp_path):
    assert_round_trip(hf[0], tmp_path, ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "image_size", "patch_size", "hidden_act",
                                        "layer_norm_eps", "projection_dim"))


def test_sharded_forward_matches_single_device(hf):
    module = load_with(hf[0])
    worst = assert_sharded_matches(module, lambda m, x: m(x), (random_pixels(8, 28, 28, seed=2),), atol=1e-5)
    print(f"CLIP sharded vs single device max abs diff {worst:.2e}")


def test_wrong_image_size_is_a_clear_error(hf):
    with pytest.raises(ValueError, match="not 28x28.*interpolate_pos_encoding"):
        load_with(hf[0])(random_pixels(1, 28, 42))
    with pytest.raises(ValueError, match="expected 3 channels"):
        load_with(hf[0])(random_pixels(1, 28, 28)[..., :2])


def test_missing_tensor_is_named(hf, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copy(hf[0] / "config.json", tmp_path / "config.json")
    tensors = load_file(hf[0] / "model.safetensors")
    del tensors["encoder.layers.1.self_attn.v_proj.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ConversionError, match="encoder.layers.1.self_attn.v_proj.bias"):
        convert.load_hf(tmp_path)


@pytest.mark.parametrize("image_size", ["336", "224"])
def test_preset_parameter_count_matches_transformers(image_size):
    ours = preset_param_count("clip_vit_l14_336", image_size)
    # openai/clip-vit-large-patch14(-336) vision_config
    theirs = meta_param_count(CLIPVisionModel, HFConfig(hidden_size=1024, intermediate_size=4096,
                                                        num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                                                        image_size=int(image_size), projection_dim=768))
    print(f"CLIP ViT-L/14-{image_size}: {ours} parameters")
    assert ours == theirs


def test_bfloat16_compute(hf):
    assert_bf16_close(hf[0], random_pixels(2, 28, 28, seed=5))


def test_vision_tower_of_full_clip_model(tmp_path):
    """A CLIPModel checkpoint (model_type 'clip', as openai/clip-vit-large-patch14-336 is published): the vision
    tower is imported, the text tower skipped; exported back it loads as a CLIPVisionModel."""
    torch.manual_seed(2)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    full = perturb_and_save(CLIPModel(CLIPConfig(vision_config=TINY, text_config=text, projection_dim=16)),
                            tmp_path / "full")
    pixels = random_pixels(2, 28, 28, seed=6)
    with torch.no_grad():
        ref = full.vision_model(to_torch(pixels)).last_hidden_state.numpy()
    assert max_abs_diff(convert.load_hf(tmp_path / "full", dtype="float32")(pixels), ref) <= 1e-4
    assert_tower_round_trip(tmp_path / "full", tmp_path, "vision_model.", CLIPVisionModel, pixels, ref)


def test_full_size_preset_traces():
    out = preset_output("clip_vit_l14_336", (2, 336, 336, 3))
    assert out.shape == (2, 1 + 24 * 24, 1024) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("module", ["clip", "siglip", "intern_vit"])
def test_position_initializer_range_sets_only_the_position_table(module):
    """ViTConfig.position_initializer_range (shared by CLIP, SigLIP, InternViT) is the std of the learned position
    table at initialisation and changes nothing else: the default keeps HF's 0.02."""
    import importlib

    from flax import nnx

    mod = importlib.import_module(f"leo_jax.models.vision.{module}")
    config_name, encoder_name = {"clip": ("CLIPVisionConfig", "CLIPVisionEncoder"),
                                 "siglip": ("SiglipVisionConfig", "SiglipVisionEncoder"),
                                 "intern_vit": ("InternViTConfig", "InternViT")}[module]
    config_class, encoder_class = getattr(mod, config_name), getattr(mod, encoder_name)
    size = dict(hidden_size=64, intermediate_size=64, num_layers=1, num_heads=4, image_size=64, patch_size=4)
    default, scaled = (nnx.state(encoder_class(config_class(**size, **extra), rngs=nnx.Rngs(0)), nnx.Param)
                       for extra in ({}, {"position_initializer_range": 0.5}))
    flat_default, flat_scaled = dict(nnx.to_flat_state(default)), dict(nnx.to_flat_state(scaled))
    assert flat_default.keys() == flat_scaled.keys()
    for path, value in flat_default.items():
        a, b = np.asarray(value[...]), np.asarray(flat_scaled[path][...])
        if path[-1] == "position_embedding":
            assert a.std() == pytest.approx(0.02, rel=0.05) and b.std() == pytest.approx(0.5, rel=0.05)
        else:
            np.testing.assert_array_equal(a, b, err_msg=str(path))
