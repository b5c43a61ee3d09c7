"""SigLIP vs transformers SiglipVisionModel (tiny, fp32): last_hidden_state (with post-LN) on a non-square input,
hidden_states[-2] (without), the pooling head, bit-exact round trip with and without the head, the vision tower of
a full SiglipModel checkpoint, sharded forward, bfloat16 compute, errors, preset size and full-size trace."""

import jax.numpy as jnp
import pytest
import torch
from transformers import SiglipConfig, SiglipModel, SiglipVisionModel
from transformers import SiglipVisionConfig as HFConfig

from leo_jax import convert
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
            patch_size=7)
FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
          "patch_size", "hidden_act", "layer_norm_eps", "vision_use_head")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip_hf")
    torch.manual_seed(0)
    return path, perturb_and_save(SiglipVisionModel(HFConfig(**TINY)), path)


def test_parity_non_square_with_interpolated_positions(hf):
    path, model = hf
    pixels = random_pixels(2, 42, 28)
    with torch.no_grad():
        ref = model(to_torch(pixels), interpolate_pos_encoding=True, output_hidden_states=True)
    module = load_with(path, interpolate_pos_encoding=True)
    out = module(pixels)
    diff = max_abs_diff(out, ref.last_hidden_state.numpy())
    print(f"SigLIP last_hidden_state 42x28 max abs diff {diff:.2e}")
    assert out.shape == (2, 6 * 4, 32) and diff <= 1e-4
    pooled = max_abs_diff(module.pooled(out), ref.pooler_output.numpy())
    print(f"SigLIP pooler_output max abs diff {pooled:.2e}")
    assert pooled <= 1e-4
    for k in (-1, -2):  # LLaVA-style: HF hidden_states[k] never has the post-LN
        raw = load_with(path, interpolate_pos_encoding=True, output_layer=k, post_norm=False)(pixels)
        assert max_abs_diff(raw, ref.hidden_states[k].numpy()) <= 1e-4, k


def test_round_trip_bit_identical(hf, tmp_path):
    assert_round_trip(hf[0], tmp_path, FIELDS)


def test_round_trip_without_head(tmp_path):
    torch.manual_seed(1)
    perturb_and_save(SiglipVisionModel(HFConfig(**TINY, vision_use_head=False)), tmp_path / "hf")
    assert_round_trip(tmp_path / "hf", tmp_path, FIELDS)
    assert convert.load_hf(tmp_path / "hf").head is None


def test_sharded_forward_matches_single_device(hf):
    worst = assert_sharded_matches(load_with(hf[0]), lambda m, x: (m(x), m.pooled(m(x))),
                                   (random_pixels(8, 28, 28, seed=2),), atol=1e-5)
    print(f"SigLIP sharded vs single device max abs diff {worst:.2e}")


def test_wrong_image_size_is_a_clear_error(hf):
    with pytest.raises(ValueError, match="not 28x28"):
        load_with(hf[0])(random_pixels(1, 35, 28))
    with pytest.raises(ValueError, match="output_layer=-5 is out of range for 3 layers"):
        load_with(hf[0], output_layer=-5)


def test_preset_parameter_count_matches_transformers():
    ours = preset_param_count("siglip_so400m")
    theirs = meta_param_count(SiglipVisionModel, HFConfig(hidden_size=1152, intermediate_size=4304,
                                                          num_hidden_layers=27, num_attention_heads=16,
                                                          patch_size=14, image_size=384))
    print(f"SigLIP so400m: {ours} parameters")
    assert ours == theirs


def test_bfloat16_compute(hf):
    assert_bf16_close(hf[0], random_pixels(2, 28, 28, seed=5))


def test_vision_tower_of_full_siglip_model(tmp_path):
    """A SiglipModel checkpoint (model_type 'siglip', as google/siglip-so400m-patch14-384 is published)."""
    torch.manual_seed(2)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    full = perturb_and_save(SiglipModel(SiglipConfig(vision_config=TINY, text_config=text)), tmp_path / "full")
    pixels = random_pixels(2, 28, 28, seed=6)
    with torch.no_grad():
        ref = full.vision_model(to_torch(pixels)).last_hidden_state.numpy()
    assert max_abs_diff(convert.load_hf(tmp_path / "full", dtype="float32")(pixels), ref) <= 1e-4
    assert_tower_round_trip(tmp_path / "full", tmp_path, "vision_model.", SiglipVisionModel, pixels, ref)


def test_full_size_preset_traces():
    out = preset_output("siglip_so400m", (2, 384, 384, 3))  # 384 = 27 patches of 14 (+ 6 unused pixels)
    assert out.shape == (2, 27 * 27, 1152) and out.dtype == jnp.bfloat16
