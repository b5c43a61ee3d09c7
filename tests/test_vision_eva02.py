"""EVA-02 vs the PyTorch reference written from timm's published architecture (leo_jax/pytorch/eva02.py; timm
itself needs torchvision and cannot be installed here), plus timm golden outputs when tests/golden has them:
both checkpoint layouts, conversion round trip, sharding, drop-path, clear errors and the L/14-336 preset's size."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from leo_jax import convert
from leo_jax.configs.eva02_large_336 import ARCH as LARGE_336
from leo_jax.convert.core import ConversionError
from leo_jax.convert.eva02 import config_from_hf
from leo_jax.models.vision.eva02 import EVA02Config, EVA02VisionEncoder
from leo_jax.pytorch.eva02 import Eva
from tests.golden.make_eva02_golden import VARIANTS, build_golden
from tests.sharding_utils import assert_sharded_matches
from tests.vision_utils import assert_round_trip, max_abs_diff, preset_param_count, random_pixels, to_torch

GOLDEN = Path(__file__).parent / "golden" / "eva02_tiny_timm.npz"
# Non-square 56x84 input (4x6 patches), RoPE coordinates rescaled to a 3x3 reference grid, head_dim 16.
TINY = dict(img_size=(56, 84), patch_size=14, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4 * 2 / 3,
            ref_feat_shape=(3, 3))
LAYOUTS = {"clip": dict(TINY, qkv_fused=False, scale_mlp=True, scale_attn_inner=True, global_pool="token"),
           "mim": dict(TINY, qkv_fused=True, scale_mlp=False, scale_attn_inner=False, global_pool="avg")}
FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_fused", "scale_mlp",
          "scale_attn_inner", "ref_feat_shape", "global_pool")


def write_timm_dir(state: dict[str, torch.Tensor], eva_args: dict, out: Path) -> Path:
    """A timm-layout tower as leo writes it: model.safetensors with timm's names + config.json (model_type eva02)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = {**eva_args, "model_type": "eva02"}
    (out / "config.json").write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in config.items()}, indent=2))
    return out


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def timm_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    model = Eva(**LAYOUTS[request.param]).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norms, biases, cls token and positions
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    path = write_timm_dir(model.state_dict(), LAYOUTS[request.param], tmp_path_factory.mktemp(request.param))
    return path, model, request.param


def test_matches_reference_on_non_square_input(timm_dir):
    path, reference, _ = timm_dir
    pixels = random_pixels(2, 56, 84)
    with torch.no_grad():
        want, hidden = reference.forward_features(to_torch(pixels), return_hidden_states=True)
    model = convert.load_hf(path)
    got = model(jnp.asarray(pixels))
    diff = max_abs_diff(got, want.numpy())
    print(f"eva02 ({path.name}) vs reference max abs diff {diff:.2e}")
    assert got.shape == (2, 1 + 4 * 6, 64) and diff <= 1e-4
    model.cfg = dataclasses.replace(model.cfg, output_layer=-2)
    assert max_abs_diff(model(jnp.asarray(pixels)), hidden[-2].numpy()) <= 1e-4


def test_round_trip_is_bit_identical(timm_dir, tmp_path):
    assert_round_trip(timm_dir[0], tmp_path, FIELDS)


def check_against_golden(path: Path, tmp_path: Path) -> float:
    """leo_jax (through the conversion family) and the reference vs the stored outputs of every variant."""
    data = np.load(path)
    worst = 0.0
    for name in VARIANTS:
        args = json.loads(str(data[f"{name}/config"]))
        prefix = f"{name}/param/"
        state = {k[len(prefix):]: torch.from_numpy(data[k].astype(np.float32)) for k in data.files
                 if k.startswith(prefix)}
        hf_dir = write_timm_dir(state, {k: v for k, v in args.items() if k != "model_type"}, tmp_path / name)
        pixels_nchw, want = data[f"{name}/pixels"], data[f"{name}/features"]
        got = convert.load_hf(hf_dir)(jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)))
        reference = Eva(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()
                           if k != "model_type"}).eval()
        reference.load_state_dict({k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))})
        with torch.no_grad():
            ref_out = reference.forward_features(torch.from_numpy(pixels_nchw)).numpy()
        worst = max(worst, max_abs_diff(got, want), max_abs_diff(ref_out, want))
    return worst


def test_golden_file_round_trips_through_the_checker(tmp_path):
    """The golden script and checker work end to end (here with the reference standing in for timm)."""
    golden = build_golden(lambda args: Eva(**args), "leo_jax/pytorch/eva02.py", tmp_path / "golden.npz")
    assert check_against_golden(golden, tmp_path / "dirs") <= 1e-4


@pytest.mark.skipif(not GOLDEN.is_file(), reason=f"{GOLDEN.name} absent: run tests/golden/make_eva02_golden.py "
                                                 f"where timm is installed to produce it")
def test_matches_timm_golden_outputs(tmp_path):
    assert str(np.load(GOLDEN)["producer"]).startswith("timm "), "the golden file must come from timm"
    diff = check_against_golden(GOLDEN, tmp_path)
    print(f"eva02 vs timm golden max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_sharded_forward_matches_single_device():
    cfg = EVA02Config(hidden_size=64, intermediate_size=170, num_layers=2, num_heads=4, patch_size=14,
                      image_size=(28, 42), rope_ref_grid=(3, 3), dtype="float32")
    model = EVA02VisionEncoder(cfg, rngs=nnx.Rngs(0))
    worst = assert_sharded_matches(model, lambda m, x: m(x), (jnp.asarray(random_pixels(8, 28, 42)),))
    print(f"eva02 sharded vs single-device max abs diff {worst:.2e}")


def test_drop_path_in_training_mode():
    cfg = EVA02Config(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=14,
                      image_size=(28, 28), drop_path_rate=0.5, dtype="float32")
    model = EVA02VisionEncoder(cfg, rngs=nnx.Rngs(0))
    pixels = jnp.asarray(random_pixels(8, 28, 28))
    with pytest.raises(ValueError, match="needs an `rng` key"):
        model(pixels, deterministic=False)
    a = model(pixels, deterministic=False, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(model(pixels, deterministic=False,
                                                                  rng=jax.random.key(0))))
    assert not np.allclose(np.asarray(a), np.asarray(model(pixels)))


def test_bad_inputs_give_clear_errors(timm_dir, tmp_path):
    path, reference, layout = timm_dir
    model = convert.load_hf(path)
    with pytest.raises(ValueError, match=r"are not 56x84 \(config.model.image_size\)"):
        model(jnp.zeros((1, 84, 56, 3)))
    state = reference.state_dict()
    del state["blocks.1.mlp.fc2.weight"]
    with pytest.raises(ConversionError, match=r"blocks\.1\.mlp\.fc2\.weight"):
        convert.load_hf(write_timm_dir(state, LAYOUTS[layout], tmp_path / "broken"))
    with pytest.raises(ConversionError, match="lacks timm Eva field"):
        config_from_hf({"architecture": "eva02_giant_patch14_224"})
    with pytest.raises(ConversionError, match="use_post_norm=True is not supported"):
        config_from_hf({**LAYOUTS["clip"], "use_post_norm": True})


def test_timm_hub_config_gives_the_preset():
    """A timm hub config.json (architecture name only) resolves to the same architecture as the preset."""
    cfg = config_from_hf({"architecture": "eva02_large_patch14_clip_336.merged2b_s304m_b16", "num_classes": 768})
    assert {k: getattr(cfg, k) for k in LARGE_336} == LARGE_336


def test_large_preset_parameter_count():
    """Counted abstractly from the preset = the reference tower on the meta device = 303,645,632 (+ timm's
    1024x768 CLIP head = 304.43M, the 304.4M timm lists for eva02_large_patch14_clip_336)."""
    with torch.device("meta"):
        tower = Eva(img_size=(336, 336), patch_size=14, embed_dim=1024, depth=24, num_heads=16, qkv_fused=False,
                    scale_attn_inner=True, ref_feat_shape=(16, 16))
    count = preset_param_count("eva02_large_336")
    assert count == sum(p.numel() for p in tower.parameters()) == 303_645_632
    assert round((count + 1024 * 768 + 768) / 1e6, 1) == 304.4


def test_forward_flops_match_xla_count_and_timm():
    """One layer (XLA counts a scanned body once): matmul + attention FLOPs within 5% of XLA's count (which adds
    the elementwise ops); the L/14-336 preset gives timm's 191.1 GMACs within 0.5%."""
    cfg = EVA02Config(hidden_size=256, intermediate_size=680, num_layers=1, num_heads=4, patch_size=14,
                      image_size=(112, 112), dtype="float32")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: EVA02VisionEncoder(cfg, rngs=nnx.Rngs(0))))
    xla = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(
        state, jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32)).cost_analysis()["flops"]
    assert abs(xla / cfg.forward_flops() - 1) < 0.05
    large = EVA02Config(**LARGE_336)
    assert abs(large.forward_flops() / 2 / 191.1e9 - 1) < 0.005 and large.visual_tokens_per_image() == 577
