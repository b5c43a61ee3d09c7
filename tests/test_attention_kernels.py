"""attention_impl: the splash kernel (Pallas interpret mode on CPU) equals the xla path for the LLM (causal, packed
rows, left padding, GQA, under a data x tensor mesh) and for bidirectional encoders (CLIP; Pix2Struct with its
padding mask), forward and gradients in fp32; auto / cuDNN fallbacks and config errors; the ahead-of-time compile
of a small LLM with splash for a v5p topology holds no T x T buffer (needs jax[tpu])."""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leo_jax.layers.attention import CudnnAttention, Segments, XlaAttention, attend, attention_kernel
from leo_jax.models.llm.decoder import CausalLM, LLMConfig
from leo_jax.models.vision.clip import CLIPVisionConfig, CLIPVisionEncoder
from leo_jax.models.vision.pix2struct import Pix2StructVisionConfig, Pix2StructVisionEncoder
from leo_jax.models.vision.sam import SamVisionConfig, SamVisionEncoder
from leo_jax.sharding import build_mesh, data_sharding, shard_module, tree_shardings

TOL = 2e-5


def _max_diff(a, b) -> float:
    """Max abs difference over all leaves, relative to the reference's largest magnitude when that exceeds 1."""
    diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return diff / max(1.0, max(float(np.max(np.abs(np.asarray(y)))) for y in jax.tree.leaves(b)))


def _loss_and_grads(model: nnx.Module, fn, *inputs):
    """(outputs, grads of sum(outputs * fixed random weights) w.r.t. every parameter), jitted."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, *inputs):
        def loss(state):
            out = fn(nnx.merge(graphdef, state), *inputs)
            weights = jax.random.normal(jax.random.key(7), out.shape, out.dtype)
            return jnp.sum(out * weights), out
        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(state)
        return out, grads

    return run(state, *inputs)


def _with_impl(make, cfg, impl: str) -> nnx.Module:
    return make(dataclasses.replace(cfg, attention_impl=impl, splash_block=128), rngs=nnx.Rngs(0))


def test_llm_splash_matches_xla_packed_left_padded_gqa_on_a_mesh():
    cfg = LLMConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                    dtype="float32", max_position_embeddings=256)
    b, t = 2, 200  # not a multiple of the 128 block: padded inside the kernel wrapper
    ids = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
    segments = np.ones((b, t), np.int32)
    segments[0, :37] = 0  # left padding
    segments[1, 80:150], segments[1, 150:] = 2, 3  # three packed samples
    segments = jnp.asarray(segments)
    real = np.asarray(segments != 0)[..., None]

    def fn(model, ids, segments):  # padding rows' outputs are never used (the loss masks them): zero them
        return jnp.where(real, model(ids, segment_ids=segments), 0.0)

    out_ref, grads_ref = _loss_and_grads(_with_impl(CausalLM, cfg, "xla"), fn, ids, segments)
    mesh = build_mesh({"ici": {"data": 2, "tensor": 2}}, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):  # splash under shard_map: batch over data, heads (4 q / 2 kv) over tensor
        model = shard_module(_with_impl(CausalLM, cfg, "splash"), mesh)
        ids_s, segments_s = (jax.device_put(x, data_sharding(mesh, 2)) for x in (ids, segments))
        out, grads = _loss_and_grads(model, fn, ids_s, segments_s)
    fwd, bwd = _max_diff(out, out_ref), _max_diff(grads, grads_ref)
    print(f"LLM splash vs xla: logits max diff {fwd:.2e}, grads {bwd:.2e} (relative to max |ref| when > 1)")
    assert float(jnp.max(jnp.abs(out_ref))) > 0.1  # not degenerate
    assert fwd < TOL and bwd < TOL


def _pix2struct_inputs(b=2, p=150, patch=12, seq_len=16):
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(b, p, 2 + patch)).astype(np.float32)
    patches[..., :2] = rng.integers(1, seq_len, size=(b, p, 2))
    mask = np.ones((b, p), bool)
    mask[0, 97:] = False
    patches[~mask] = 0.0
    return jnp.asarray(patches), jnp.asarray(mask)


@pytest.mark.parametrize("name", ["clip", "pix2struct"])
def test_encoder_splash_matches_xla(name):
    if name == "clip":  # 1 + 12 x 12 = 145 tokens, bidirectional, no padding
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, patch_size=4,
                               image_size=48, dtype="float32")
        make, inputs, fn = CLIPVisionEncoder, (jax.random.normal(jax.random.key(2), (2, 48, 48, 3)),), \
            lambda m, x: m(x)
    else:  # 150 patches of which 53 are padding in the first image: padding keys map to segment id 0
        cfg = Pix2StructVisionConfig(hidden_size=32, patch_embed_hidden_size=12, d_ff=48, d_kv=8, num_layers=2,
                                     num_heads=4, seq_len=16, max_patches=150, dtype="float32")
        make, inputs, fn = Pix2StructVisionEncoder, _pix2struct_inputs(), lambda m, p, k: m(p, k)
    out_ref, grads_ref = _loss_and_grads(_with_impl(make, cfg, "xla"), fn, *inputs)
    out, grads = _loss_and_grads(_with_impl(make, cfg, "splash"), fn, *inputs)
    fwd, bwd = _max_diff(out, out_ref), _max_diff(grads, grads_ref)
    print(f"{name} splash vs xla: outputs max diff {fwd:.2e}, grads {bwd:.2e} (relative to max |ref| when > 1)")
    assert fwd < TOL and bwd < TOL


def test_splash_row_of_only_padding_keys_stays_finite():
    """An empty image slot (every key padding) leaves no key to attend; splash must not divide by zero."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 2, 8)) for i in range(3))
    mask = jnp.ones((2, 16), jnp.int32).at[1].set(0)
    segments = Segments(jnp.ones_like(mask), mask)
    out, grads = jax.value_and_grad(lambda *a: jnp.sum(attend(*a, impl="splash", segments=segments) ** 2),
                                    argnums=(0, 1, 2))(q, k, v)
    assert np.isfinite(out) and all(np.isfinite(g).all() for g in grads)
    ref = attend(q, k, v, segments=segments)
    np.testing.assert_allclose(attend(q, k, v, impl="splash", segments=segments)[0], ref[0], atol=1e-5)


def test_auto_is_xla_on_cpu_and_cudnn_falls_back_with_a_log(caplog):
    assert isinstance(attention_kernel("auto"), XlaAttention)
    assert isinstance(attention_kernel("cudnn"), CudnnAttention)
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 16, 2, 8)) for i in range(3))
    segments = Segments(jnp.ones((1, 16), jnp.int32), jnp.ones((1, 16), jnp.int32).at[0, 12:].set(0))
    with caplog.at_level(logging.WARNING, logger="leo_jax.layers.attention"):
        out = attend(q, k, v, impl="cudnn", segments=segments, causal=True)  # fp32: cuDNN needs bf16/fp16
    assert "using xla" in caplog.text
    np.testing.assert_array_equal(out, attend(q, k, v, impl="xla", segments=segments, causal=True))


def test_sam_with_relative_positions_stays_on_xla(caplog):
    cfg = SamVisionConfig(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=24, patch_size=8, image_size=32,
                          output_channels=8, window_size=2, global_attn_indexes=(1,), dtype="float32")
    pixels = jax.random.normal(jax.random.key(3), (1, 32, 32, 3))
    ref = SamVisionEncoder(cfg, rngs=nnx.Rngs(0))(pixels)
    with caplog.at_level(logging.WARNING, logger="leo_jax.layers.attention"):
        out = SamVisionEncoder(dataclasses.replace(cfg, attention_impl="splash"), rngs=nnx.Rngs(0))(pixels)
    assert "relative-position bias" in caplog.text
    np.testing.assert_array_equal(out, ref)


def test_bad_attention_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"config.model.attention_impl='flash': use one of \('xla', 'splash'"):
        LLMConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
                  attention_impl="flash")
    with pytest.raises(ValueError, match="config.model.splash_block=100: use a positive multiple of 128"):
        CLIPVisionConfig(splash_block=100)
    with pytest.raises(ValueError, match="causal attention needs as many keys as queries"):
        q = jnp.zeros((1, 4, 2, 8))
        attend(q, jnp.zeros((1, 8, 2, 8)), jnp.zeros((1, 8, 2, 8)), impl="splash", causal=True)


def _v5p_devices():
    # Describing a topology loads libtpu, which by default refuses to load in a second process on the machine.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        return topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1", chip_config_name="megacore",
                                            chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    except Exception as e:  # noqa: BLE001 - libtpu missing: say so
        pytest.skip(f"needs jax[tpu] (libtpu) to describe a v5p topology: {type(e).__name__}: {e}")


def test_splash_aot_for_v5p_has_no_t_by_t_buffer():
    """Forward + backward of a 1-layer LLM over 2048 tokens, compiled for 4 v5p chips (data 2 x tensor 2)."""
    devices = _v5p_devices()
    t, heads = 2048, 4
    cfg = LLMConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=heads,
                    num_kv_heads=2, dtype="bfloat16", max_position_embeddings=t, attention_impl="splash")
    mesh = build_mesh({"ici": {"data": 2, "tensor": 2}}, devices=devices)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))

    def loss(state, ids, segments):
        return jnp.mean(nnx.merge(graphdef, state)(ids, segment_ids=segments))

    shardings = tree_shardings(state, mesh)
    step = jax.jit(jax.grad(loss), in_shardings=(shardings, data_sharding(mesh, 2), data_sharding(mesh, 2)),
                   out_shardings=shardings)
    ids = jax.ShapeDtypeStruct((4, t), jnp.int32)
    # bf16 kernels: the tests' global 'highest' matmul precision would ask Mosaic for fp32 contraction on bf16.
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        compiled = step.lower(state, ids, ids).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    text = compiled.as_text()
    # Per chip: 2 sequences x 2 heads; materialised fp32 logits would take 2 * 2 * T * T * 4 bytes = 64 MiB.
    logits_bytes = 2 * 2 * t * t * 4
    print(f"splash AOT v5p: temporaries {temp / 2**20:.1f} MiB per chip vs {logits_bytes / 2**20:.0f} MiB of logits")
    assert "tpu_custom_call" in text  # the Pallas kernel, not interpret mode
    assert f"{t},{t}]" not in text
    assert temp < logits_bytes / 2
