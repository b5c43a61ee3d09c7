"""Pix2Struct vision encoder vs transformers Pix2StructVisionModel: padded patch batches, the patch budget,
conversion round trip, sharding, clear errors and the Large preset's size."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from leo_jax import convert
from leo_jax.models.vision.pix2struct import Pix2StructVisionConfig, Pix2StructVisionEncoder
from tests.sharding_utils import assert_sharded_matches
from tests.vision_utils import (
    assert_round_trip,
    max_abs_diff,
    meta_param_count,
    perturb_and_save,
    preset_param_count,
    read_tensors,
)

PATCH = 4 * 4 * 3
TINY = dict(hidden_size=32, patch_embed_hidden_size=PATCH, d_ff=48, d_kv=8, num_hidden_layers=2,
            num_attention_heads=4, seq_len=16)


def flattened_patches(grids: list[tuple[int, int]], max_patches: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Patches as Pix2Struct's processor lays them out: rows x cols real patches (1-based row/column ids first),
    then zero padding up to `max_patches`. Returns (patches [B, P, 2 + PATCH], mask [B, P])."""
    rng = np.random.default_rng(seed)
    patches = np.zeros((len(grids), max_patches, 2 + PATCH), np.float32)
    mask = np.zeros((len(grids), max_patches), np.float32)
    for b, (rows, cols) in enumerate(grids):
        n = rows * cols
        r, c = np.meshgrid(np.arange(1, rows + 1), np.arange(1, cols + 1), indexing="ij")
        patches[b, :n, 0], patches[b, :n, 1] = r.reshape(-1), c.reshape(-1)
        patches[b, :n, 2:] = rng.normal(size=(n, PATCH))
        mask[b, :n] = 1
    return patches, mask


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import Pix2StructVisionConfig as HFConfig
    from transformers import Pix2StructVisionModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pix2struct_hf")
    return path, perturb_and_save(Pix2StructVisionModel(HFConfig(**TINY)), path)


def test_padded_patches_match_transformers(hf_dir):
    path, torch_model = hf_dir
    patches, mask = flattened_patches([(3, 4), (2, 5)], max_patches=16)  # non-square grids, 4 and 6 padding rows
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(patches), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    model = convert.load_hf(path)
    got = model(jnp.asarray(patches), jnp.asarray(mask))
    diff = max_abs_diff(got, ref.last_hidden_state.numpy())  # every position, padding included
    print(f"pix2struct last_hidden_state max abs diff {diff:.2e}")
    assert got.shape == (2, 16, 32) and diff <= 1e-4
    # without a mask, padding is found as all-zero patches, as in transformers
    assert max_abs_diff(model(jnp.asarray(patches)), ref.last_hidden_state.numpy()) <= 1e-4
    model.cfg = dataclasses.replace(model.cfg, output_layer=-2)
    assert max_abs_diff(model(jnp.asarray(patches), jnp.asarray(mask)), ref.hidden_states[-2].numpy()) <= 1e-4


def test_real_patches_do_not_depend_on_the_padding_budget(hf_dir):
    model = convert.load_hf(hf_dir[0])
    small, small_mask = flattened_patches([(3, 4)], max_patches=12)
    big, big_mask = flattened_patches([(3, 4)], max_patches=16)
    big[:, 12:, 2:] = 7.0  # garbage in masked-out slots must not leak into the real tokens
    out_small = model(jnp.asarray(small), jnp.asarray(small_mask))
    out_big = model(jnp.asarray(big), jnp.asarray(big_mask))
    assert max_abs_diff(out_small, out_big[:, :12]) <= 1e-5


def test_round_trip_is_bit_identical(hf_dir, tmp_path):
    assert_round_trip(hf_dir[0], tmp_path, ("hidden_size", "patch_embed_hidden_size", "d_ff", "d_kv",
                                            "num_hidden_layers", "num_attention_heads", "dense_act_fn",
                                            "layer_norm_eps", "seq_len", "architectures"))


def test_full_pix2struct_checkpoint_gives_its_encoder(tmp_path):
    """google/pix2struct-* files are Pix2StructForConditionalGeneration: the encoder is read from under 'encoder.'
    (decoder skipped), matches the torch encoder, and its tensors export bit-identically under their names."""
    from transformers import Pix2StructConfig, Pix2StructForConditionalGeneration

    torch.manual_seed(1)
    config = Pix2StructConfig(vision_config=TINY, text_config=dict(hidden_size=32, d_ff=48, d_kv=8, num_layers=1,
                                                                   num_heads=4, vocab_size=64))
    torch_model = perturb_and_save(Pix2StructForConditionalGeneration(config), tmp_path / "full")
    patches, mask = flattened_patches([(3, 4), (2, 5)], max_patches=16)
    with torch.no_grad():
        want = torch_model.encoder(torch.from_numpy(patches), attention_mask=torch.from_numpy(mask))
    got = convert.load_hf(tmp_path / "full")(jnp.asarray(patches), jnp.asarray(mask))
    assert max_abs_diff(got, want.last_hidden_state.numpy()) <= 1e-4
    convert.import_hf(tmp_path / "full", tmp_path / "leo")
    back = read_tensors(convert.export_hf(tmp_path / "leo", tmp_path / "back"))
    original = {k: v for k, v in read_tensors(tmp_path / "full").items() if k.startswith("encoder.")}
    assert sorted(back) == sorted(original)
    assert all(back[k].tobytes() == original[k].tobytes() for k in original)
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["model_type"] == "pix2struct" and exported["vision_config"]["d_ff"] == TINY["d_ff"]


def test_sharded_forward_matches_single_device():
    cfg = Pix2StructVisionConfig(hidden_size=32, patch_embed_hidden_size=PATCH, d_ff=48, d_kv=8, num_layers=2,
                                 num_heads=4, seq_len=16, max_patches=16, dtype="float32")
    model = Pix2StructVisionEncoder(cfg, rngs=nnx.Rngs(0))
    patches, mask = flattened_patches([(3, 4), (2, 5), (4, 4), (1, 3)] * 2, max_patches=16)
    worst = assert_sharded_matches(model, lambda m, p, k: m(p, k), (jnp.asarray(patches), jnp.asarray(mask)))
    print(f"pix2struct sharded vs single-device max abs diff {worst:.2e}")


def test_bad_inputs_give_clear_errors(hf_dir):
    model = convert.load_hf(hf_dir[0])
    patches, mask = flattened_patches([(2, 2)], max_patches=8)
    with pytest.raises(ValueError, match=r"flattened_patches \[B, P, 50\]"):
        model(jnp.asarray(patches[..., 2:]), jnp.asarray(mask))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(jnp.asarray(patches), jnp.asarray(mask[:, :4]))
    model.cfg = dataclasses.replace(model.cfg, max_patches=4)
    with pytest.raises(ValueError, match="8 patches exceed max_patches=4"):
        model(jnp.asarray(patches), jnp.asarray(mask))
    with pytest.raises(ValueError, match="config.model.output_layer=3 is out of range"):
        Pix2StructVisionConfig(num_layers=2, output_layer=3)


def test_large_preset_matches_transformers_parameter_count():
    from transformers import Pix2StructVisionConfig as HFConfig
    from transformers import Pix2StructVisionModel

    ref = meta_param_count(Pix2StructVisionModel, HFConfig(hidden_size=1536, patch_embed_hidden_size=768, d_ff=3968,
                                                           d_kv=64, num_hidden_layers=18, num_attention_heads=24))
    assert preset_param_count("pix2struct_large") == ref == 512_812_032


def test_forward_flops_match_xla_count():
    """One layer (XLA counts a scanned body once): matmul + attention FLOPs within 5% of XLA's count (which adds
    the elementwise ops)."""
    cfg = Pix2StructVisionConfig(hidden_size=256, patch_embed_hidden_size=768, d_ff=680, d_kv=64, num_layers=1,
                                 num_heads=4, seq_len=64, max_patches=64, dtype="float32")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Pix2StructVisionEncoder(cfg, rngs=nnx.Rngs(0))))
    xla = jax.jit(lambda s, p, m: nnx.merge(graphdef, s)(p, m)).lower(
        state, jax.ShapeDtypeStruct((1, 64, 770), jnp.float32), jax.ShapeDtypeStruct((1, 64), jnp.float32)
    ).cost_analysis()["flops"]
    assert abs(xla / cfg.forward_flops() - 1) < 0.05
