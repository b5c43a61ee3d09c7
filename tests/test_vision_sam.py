"""SAM image encoder vs transformers SamVisionModel (tiny, fp32): the neck map with windows that need padding and
interleaved global layers, query-chunked global attention, bit-exact round trip, the vision tower of a full
SamModel checkpoint, sharded forward, bfloat16 compute, errors, preset size and full-size trace."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import SamConfig, SamModel, SamVisionModel
from transformers import SamVisionConfig as HFConfig

from leo_jax import convert
from leo_jax.convert.api import module_from_params
from leo_jax.convert.core import get_family
from leo_jax.models.vision.sam import SamVisionConfig, window_partition, window_unpartition
from tests.sharding_utils import assert_sharded_matches
from tests.vision_utils import (
    assert_bf16_close,
    assert_round_trip,
    assert_tower_round_trip,
    jit_call,
    max_abs_diff,
    meta_param_count,
    perturb_and_save,
    preset_output,
    preset_param_count,
    random_pixels,
    to_torch,
)

# 48 px / patch 8 = 6x6 grid; window 4 pads it to 8x8 (four windows); layers W W G W G.
TINY = dict(hidden_size=32, num_hidden_layers=5, num_attention_heads=4, mlp_dim=64, image_size=48, patch_size=8,
            window_size=4, global_attn_indexes=[2, 4], output_channels=16)
FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_dim", "image_size", "patch_size",
          "window_size", "global_attn_indexes", "output_channels", "qkv_bias", "use_abs_pos", "use_rel_pos",
          "layer_norm_eps", "hidden_act")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam_hf")
    torch.manual_seed(0)
    return path, perturb_and_save(SamVisionModel(HFConfig(**TINY)), path)


def test_layer_schedule_and_window_padding():
    cfg = SamVisionConfig(num_layers=5, global_attn_indexes=(2, 4), window_size=4)
    assert cfg.window_layers == (0, 1, 3) and cfg.global_layers == (2, 4)
    assert cfg.runs() == [(False, 0, 2), (True, 0, 1), (False, 2, 3), (True, 1, 2)]
    x = np.arange(2 * 6 * 6 * 3, dtype=np.float32).reshape(2, 6, 6, 3)
    windows = np.asarray(window_partition(x, 4))
    assert windows.shape == (2 * 4, 4, 4, 3) and np.all(windows[1, :, 2:] == 0)  # right padding of window (0, 1)
    assert np.array_equal(window_unpartition(windows, 4, 6, 6), x)


def test_parity_neck_map(hf):
    path, model = hf
    pixels = random_pixels(2, 48, 48)
    with torch.no_grad():
        ref = model(to_torch(pixels)).last_hidden_state.permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC
    out = convert.load_hf(path, dtype="float32")(pixels)
    diff = max_abs_diff(out, ref)
    print(f"SAM neck map (windows padded 6->8, global layers 2 and 4) max abs diff {diff:.2e}")
    assert out.shape == (2, 6, 6, 16) and diff <= 1e-4


def test_chunked_global_attention_is_exact(hf):
    base = convert.load_hf(hf[0], dtype="float32")
    params = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    pixels = random_pixels(2, 48, 48, seed=7)
    reference = np.asarray(jit_call(base, pixels))
    for rows in (2, 3):  # of the 6 grid rows
        cfg = dataclasses.replace(base.cfg, global_query_chunk_rows=rows)
        chunked = module_from_params(get_family("sam_vision"), cfg, params)
        assert max_abs_diff(jit_call(chunked, pixels), reference) <= 1e-5


def test_round_trip_bit_identical(hf, tmp_path):
    assert_round_trip(hf[0], tmp_path, FIELDS)


def test_sharded_forward_matches_single_device(hf):
    worst = assert_sharded_matches(convert.load_hf(hf[0], dtype="float32"), lambda m, x: m(x),
                                   (random_pixels(8, 48, 48, seed=2),), atol=1e-5)
    print(f"SAM sharded vs single device max abs diff {worst:.2e}")


def test_wrong_image_size_is_a_clear_error(hf):
    module = convert.load_hf(hf[0], dtype="float32")
    with pytest.raises(ValueError, match="not 48x48.*pad"):
        module(random_pixels(1, 48, 40))


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="global_attn_indexes=\\(5, 24\\)"):
        SamVisionConfig(num_layers=24, global_attn_indexes=(5, 24))
    with pytest.raises(ValueError, match="global_query_chunk_rows=5 must be 0 or divide the patch grid 64"):
        SamVisionConfig(global_query_chunk_rows=5)


def test_preset_parameter_count_matches_transformers():
    ours = preset_param_count("sam_vit_l")
    # facebook/sam-vit-large vision_config
    theirs = meta_param_count(SamVisionModel, HFConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                       global_attn_indexes=[5, 11, 17, 23], mlp_dim=4096,
                                                       output_channels=256, image_size=1024, patch_size=16,
                                                       window_size=14))
    print(f"SAM ViT-L image encoder: {ours} parameters")
    assert ours == theirs


def test_bfloat16_compute(hf):
    assert_bf16_close(hf[0], random_pixels(2, 48, 48, seed=5))


def test_vision_tower_of_full_sam_model(tmp_path):
    """A SamModel checkpoint (model_type 'sam', as facebook/sam-vit-large is published): prompt encoder and mask
    decoder are skipped."""
    torch.manual_seed(2)
    full = perturb_and_save(SamModel(SamConfig(vision_config=TINY)), tmp_path / "full")
    pixels = random_pixels(1, 48, 48, seed=6)
    with torch.no_grad():
        ref = full.vision_encoder(to_torch(pixels)).last_hidden_state.numpy()
    out = convert.load_hf(tmp_path / "full", dtype="float32")(pixels)
    assert max_abs_diff(np.asarray(out).transpose(0, 3, 1, 2), ref) <= 1e-4
    assert_tower_round_trip(tmp_path / "full", tmp_path, "vision_encoder.", SamVisionModel, pixels, ref)


@pytest.mark.parametrize("chunk_rows", [0, 16])
def test_full_size_preset_traces(chunk_rows):
    out = preset_output("sam_vit_l", (2, 1024, 1024, 3), (f"model.global_query_chunk_rows={chunk_rows}",))
    assert out.shape == (2, 64, 64, 256) and out.dtype == jnp.bfloat16
