"""CoTR against the PyTorch reference of the CoTR equations; padding, prompt-only conditioning, gradients."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from leo_jax.models.cotr import CoTR, CoTRConfig
from leo_jax.pytorch import CoTR as TorchCoTR
from tests.sharding_utils import assert_sharded_matches

TEXT_WIDTH = 12
THREE_EXPERTS = ((6, 10, 4), (9, 5, 7))  # widths d_i, token counts N_i
TWO_EXPERTS = ((8, 5), (6, 11))
SQUARE_EXPERTS = ((6, 10), (16, 9))  # token grids 4 x 4 and 3 x 3 (spatial_prior needs square grids)


def _config(experts, pooling="sum", scale="sqrt_expert_width", visual_bias=True, spatial_prior=0.0) -> CoTRConfig:
    widths, tokens = experts
    return CoTRConfig(expert_widths=widths, expert_tokens=tokens, text_width=TEXT_WIDTH, num_queries=4, proj_width=8,
                      pooling=pooling, scale=scale, visual_bias=visual_bias, spatial_prior=spatial_prior,
                      dtype="float32")


def _model(cfg: CoTRConfig, seed: int = 0) -> CoTR:
    """CoTR with weights of std 0.3 (instead of 0.02), so the attention weights are far from uniform."""
    module = CoTR(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 100)
    for _, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        variable.set_value(jnp.asarray(0.3 * rng.normal(size=variable.shape), jnp.float32))
    return module


def _inputs(cfg: CoTRConfig, text_len: int = 6, seed: int = 0):
    """A batch of 4: sample 0 fully valid, 1 and 2 with padded visual tokens and answer tokens masked out of the
    prompt, 3 without image (all visual masks False)."""
    rng = np.random.default_rng(seed)
    batch = 4
    features = [rng.normal(size=(batch, n, d)).astype(np.float32) for d, n in zip(cfg.expert_widths,
                                                                                   cfg.expert_tokens)]
    masks = []
    for n in cfg.expert_tokens:
        valid = np.array([n, max(1, n - 2), max(1, n // 2), 0])
        masks.append(np.arange(n)[None, :] < valid[:, None])
    text = rng.normal(size=(batch, text_len, TEXT_WIDTH)).astype(np.float32)
    prompt_len = np.array([text_len, text_len - 2, 3, 4])
    text_mask = np.arange(text_len)[None, :] < prompt_len[:, None]
    return features, masks, text, text_mask


def _run(module, features, masks, text, text_mask) -> np.ndarray:
    return np.asarray(module([jnp.asarray(f) for f in features], jnp.asarray(text),
                             feature_masks=[jnp.asarray(m) for m in masks], text_mask=jnp.asarray(text_mask)))


def _torch_reference(module: CoTR) -> TorchCoTR:
    cfg = module.cfg
    reference = TorchCoTR(cfg.expert_widths, cfg.text_width, cfg.num_queries, cfg.proj_width, cfg.pooling, cfg.scale,
                          visual_bias=cfg.visual_bias, spatial_prior=cfg.spatial_prior, text_bias=cfg.text_bias,
                          mode=cfg.mode)
    state = {}
    for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        name, value = ".".join(map(str, path)), np.array(variable.get_value())
        if path[-1] == "kernel":  # Linear: torch weight = kernel transposed
            name, value = name.removesuffix("kernel") + "weight", value.T.copy()
        state[name] = torch.from_numpy(value)
    reference.load_state_dict(state, strict=True)
    return reference


@pytest.mark.parametrize("experts, pooling, scale, visual_bias, spatial_prior", [
    (THREE_EXPERTS, "sum", "sqrt_expert_width", True, 0.0),
    (THREE_EXPERTS, "mean", "sqrt_expert_width", True, 0.0),
    (TWO_EXPERTS, "sum", "sqrt_expert_width", True, 0.0),
    (TWO_EXPERTS, "mean", "sqrt_expert_width", True, 0.0),
    (THREE_EXPERTS, "sum", "sqrt_proj_width", True, 0.0),
    (THREE_EXPERTS, "mean", "sqrt_expert_width", False, 0.0),
    (SQUARE_EXPERTS, "mean", "sqrt_expert_width", False, 0.25),
])
def test_cotr_equals_torch_reference_of_the_equations(experts, pooling, scale, visual_bias, spatial_prior):
    cfg = _config(experts, pooling, scale, visual_bias, spatial_prior)
    module = _model(cfg)
    features, masks, text, text_mask = _inputs(cfg)
    ours = _run(module, features, masks, text, text_mask)
    with torch.no_grad():
        theirs = _torch_reference(module)([torch.from_numpy(f) for f in features], torch.from_numpy(text),
                                          [torch.from_numpy(m) for m in masks], torch.from_numpy(text_mask)).numpy()
    diff = float(np.max(np.abs(ours.astype(np.float64) - theirs)))
    print(f"CoTR {len(cfg.expert_widths)} experts pooling={pooling} scale={scale} visual_bias={visual_bias} "
          f"spatial_prior={spatial_prior}: "
          f"max abs diff vs torch {diff:.2e}")
    assert ours.shape == (4, cfg.num_queries, sum(cfg.expert_widths))
    assert diff <= 1e-5
    assert np.all(ours[3] == 0), "a sample without image must give zeros"
    assert np.abs(ours[:3]).max() > 0.1
    if not visual_bias:  # the flag changes the scores: same weights with the pooled visual rows differ
        with_bias = CoTR(dataclasses.replace(cfg, visual_bias=True), rngs=nnx.Rngs(0))
        nnx.update(with_bias, nnx.state(module))
        assert np.max(np.abs(_run(with_bias, features, masks, text, text_mask) - ours)) > 1e-2
    if spatial_prior:  # and the prior changes them too
        without = CoTR(dataclasses.replace(cfg, spatial_prior=0.0), rngs=nnx.Rngs(0))
        nnx.update(without, nnx.state(module))
        assert np.max(np.abs(_run(without, features, masks, text, text_mask) - ours)) > 1e-2


@pytest.mark.parametrize("experts, pooling, visual_bias, spatial_prior", [
    (THREE_EXPERTS, "sum", True, 0.0), (SQUARE_EXPERTS, "mean", False, 0.25)])
def test_attention_weights_are_the_softmax_that_makes_the_output(experts, pooling, visual_bias, spatial_prior):
    """`CoTR.attention` returns A_i: rows sum to 1 over the valid tokens, padding gets 0, and concat_i(A_i I_i)
    recomputed from them is the call's output."""
    cfg = _config(experts, pooling, visual_bias=visual_bias, spatial_prior=spatial_prior)
    module = _model(cfg)
    features, masks, text, text_mask = _inputs(cfg)
    weights = module.attention([jnp.asarray(f) for f in features], jnp.asarray(text),
                               feature_masks=[jnp.asarray(m) for m in masks], text_mask=jnp.asarray(text_mask))
    weights = [np.asarray(w) for w in weights]
    for w, m, n in zip(weights, masks, cfg.expert_tokens):
        assert w.shape == (4, cfg.num_queries, n) and w.dtype == np.float32
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
        assert np.all(w[:3][~np.broadcast_to(m[:3, None, :], w[:3].shape)] == 0), "padding must get weight 0"
        assert w[:3].max() > 2.0 / n, "weights are near uniform: the check would not see a wrong softmax"
    recomputed = np.concatenate([np.einsum("bqn,bnd->bqd", w, np.where(m[..., None], f, 0))
                                 for w, f, m in zip(weights, features, masks)], axis=-1)
    diff = float(np.max(np.abs(recomputed - _run(module, features, masks, text, text_mask))))
    print(f"CoTR output recomputed from the returned weights: max abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_a_sharp_spatial_prior_pools_each_query_region():
    """With zero queries and projections only the prior is left: each of the 2 x 2 queries averages the 2 x 2 block
    of the 4 x 4 token grid under its cell (its four equally near tokens)."""
    cfg = _config(SQUARE_EXPERTS, "mean", "sqrt_expert_width", False, spatial_prior=0.02)
    module = CoTR(cfg, rngs=nnx.Rngs(0))
    for _, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        variable.set_value(jnp.zeros(variable.shape, jnp.float32))
    features, _, text, _ = _inputs(cfg)
    out = _run(module, features, [np.ones(f.shape[:2], bool) for f in features], text,
               np.ones(text.shape[:2], bool))
    grid = features[0].reshape(4, 2, 2, 2, 2, 6)  # [B, block row, row in block, block col, col in block, d]
    blocks = grid.mean(axis=(2, 4)).reshape(4, 4, 6)  # query order: row-major over the 2 x 2 cells
    np.testing.assert_allclose(out[..., :6], blocks, atol=1e-5)
    assert np.max(np.abs(out[:, 0, :6] - out[:, 3, :6])) > 0.1  # regions differ: the layout survives


def test_spatial_prior_needs_square_grids():
    with pytest.raises(ValueError, match=r"expert_tokens\[1\]=5 is not a square grid"):
        _config(THREE_EXPERTS, spatial_prior=0.1)
    with pytest.raises(ValueError, match="spatial_prior must be >= 0"):
        _config(SQUARE_EXPERTS, spatial_prior=-1.0)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_padding_does_not_change_the_result(pooling):
    """The same weights on inputs with extra padded visual tokens (experts 0 and 2) and text tokens, all with random
    values and mask False, give the same output."""
    cfg = _config(THREE_EXPERTS, pooling)
    module = _model(cfg)
    features, masks, text, text_mask = _inputs(cfg)
    extra = (3, 0, 4)
    padded_cfg = _config((cfg.expert_widths, tuple(n + e for n, e in zip(cfg.expert_tokens, extra))), pooling)
    padded = CoTR(padded_cfg, rngs=nnx.Rngs(1))
    nnx.update(padded, nnx.state(module))  # parameters do not depend on the token counts
    rng = np.random.default_rng(7)
    padded_features = [np.concatenate([f, 5 * rng.normal(size=(f.shape[0], e, f.shape[2]))], 1).astype(np.float32)
                       for f, e in zip(features, extra)]
    padded_masks = [np.concatenate([m, np.zeros((m.shape[0], e), bool)], 1) for m, e in zip(masks, extra)]
    padded_text = np.concatenate([text, 5 * rng.normal(size=(text.shape[0], 3, TEXT_WIDTH))], 1).astype(np.float32)
    padded_text_mask = np.concatenate([text_mask, np.zeros((text.shape[0], 3), bool)], 1)

    reference = _run(module, features, masks, text, text_mask)
    out = _run(padded, padded_features, padded_masks, padded_text, padded_text_mask)
    diff = float(np.max(np.abs(out - reference)))
    print(f"CoTR pooling={pooling}: max abs diff with padding {diff:.2e}")
    assert diff <= 1e-6


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_output_depends_on_prompt_tokens_only(pooling):
    cfg = _config(THREE_EXPERTS, pooling)
    module = _model(cfg)
    features, masks, text, text_mask = _inputs(cfg)
    reference = _run(module, features, masks, text, text_mask)

    answer_changed = text.copy()
    answer_changed[~text_mask] += 10.0  # tokens outside the prompt mask (answer / padding)
    np.testing.assert_array_equal(_run(module, features, masks, answer_changed, text_mask), reference)

    prompt_changed = text.copy()
    prompt_changed[1, 0] += 1.0  # one prompt token of sample 1
    out = _run(module, features, masks, prompt_changed, text_mask)
    assert np.abs(out[1] - reference[1]).max() > 1e-3, "CoTR ignores the prompt"
    np.testing.assert_array_equal(np.delete(out, 1, 0), np.delete(reference, 1, 0))  # other samples untouched


def test_jit_and_grad_reach_queries_and_every_projection():
    cfg = _config(THREE_EXPERTS)
    module = _model(cfg)
    features, masks, text, text_mask = _inputs(cfg)
    target = jnp.asarray(np.random.default_rng(3).normal(size=(4, cfg.num_queries, sum(cfg.expert_widths))),
                         jnp.float32)

    @nnx.jit
    def loss_and_grads(model, features, masks, text, text_mask):
        def loss_fn(m):
            out = m(features, text, feature_masks=masks, text_mask=text_mask)
            return jnp.mean((out - target) ** 2)
        return nnx.value_and_grad(loss_fn)(model)

    loss, grads = loss_and_grads(module, [jnp.asarray(f) for f in features], [jnp.asarray(m) for m in masks],
                                 jnp.asarray(text), jnp.asarray(text_mask))
    assert np.isfinite(float(loss))
    flat = {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    assert set(flat) == {"text_proj.kernel"} | {f"experts.{i}.{name}" for i in range(3)
                                                for name in ("query", "query_proj.kernel", "token_proj.kernel")}
    for path, grad in flat.items():
        assert np.all(np.isfinite(grad)), path
        assert np.abs(grad).max() > 1e-6, f"no gradient reaches {path}"


def test_sharded_forward_matches_single_device():
    cfg = _config(THREE_EXPERTS)
    module = _model(cfg)
    features, masks, text, text_mask = _inputs(cfg)
    features, masks = [np.concatenate([f, f]) for f in features], [np.concatenate([m, m]) for m in masks]
    text, text_mask = np.concatenate([text, text]), np.concatenate([text_mask, text_mask])  # batch 8

    def forward(m, f0, f1, f2, m0, m1, m2, t, tm):
        return m([f0, f1, f2], t, feature_masks=[m0, m1, m2], text_mask=tm)

    worst = assert_sharded_matches(module, forward, (*features, *masks, text, text_mask), atol=1e-5)
    print(f"CoTR sharded vs single device max abs diff {worst:.2e}")


def test_params_carry_logical_axes():
    module = CoTR(_config(TWO_EXPERTS), rngs=nnx.Rngs(0))
    axes = {path: v.get_metadata()["axes"] for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    assert axes[("experts", 1, "query")] == ("queries", "embed")
    assert axes[("experts", 0, "token_proj", "kernel")] == ("embed", "mlp")
    assert axes[("text_proj", "kernel")] == ("embed", "mlp")
    assert module.experts[1].query.shape == (4, 5)


def test_bad_inputs_and_config_are_clear_errors():
    cfg = _config(TWO_EXPERTS)
    module = CoTR(cfg, rngs=nnx.Rngs(0))
    features, masks, text, text_mask = _inputs(cfg)
    with pytest.raises(ValueError, match="features from 1 experts but config.cotr lists 2"):
        module([jnp.asarray(features[0])], jnp.asarray(text))
    with pytest.raises(ValueError, match=r"expert 1: features must be \[B=4, N_i=11, d_i=5\].*got \(4, 11, 6\)"):
        module([jnp.asarray(features[0]), jnp.zeros((4, 11, 6))], jnp.asarray(text))
    with pytest.raises(ValueError, match=r"text embeddings must be \[B, T, 12\]"):
        module([jnp.asarray(f) for f in features], jnp.zeros((4, 6, 5)))
    with pytest.raises(ValueError, match="expert_widths has 2 entries but expert_tokens has 1"):
        CoTRConfig(expert_widths=(8, 5), expert_tokens=(6,), text_width=12)
    with pytest.raises(ValueError, match="config.cotr.pooling='max'"):
        CoTRConfig.from_config({"expert_widths": (8,), "expert_tokens": (6,), "text_width": 12, "pooling": "max"})


def test_bfloat16_compute_stays_close_to_float32():
    cfg = _config(THREE_EXPERTS)
    module = _model(cfg)
    bf16 = CoTR(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(1))
    nnx.update(bf16, nnx.state(module))
    inputs = _inputs(cfg)
    reference, out = _run(module, *inputs), _run(bf16, *inputs)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(out.astype(np.float32)))
    rel = np.abs(out.astype(np.float32) - reference).max() / np.abs(reference).max()
    print(f"CoTR bfloat16 vs float32: max abs diff / max abs value {rel:.2e}")
    assert rel < 5e-2


def _mode_config(mode, text_bias=True, experts=((6, 10), (16, 16)), visual_bias=False) -> CoTRConfig:
    widths, tokens = experts
    return CoTRConfig(expert_widths=widths, expert_tokens=tokens, text_width=TEXT_WIDTH, num_queries=4, proj_width=8,
                      pooling="mean", visual_bias=visual_bias, text_bias=text_bias, mode=mode, dtype="float32")


def _torch_output(module, features, masks, text, text_mask) -> np.ndarray:
    with torch.no_grad():
        return _torch_reference(module)([torch.from_numpy(f) for f in features], torch.from_numpy(text),
                                        [torch.from_numpy(m) for m in masks], torch.from_numpy(text_mask)).numpy()


@pytest.mark.parametrize("mode, text_bias, experts, visual_bias", [
    ("cotr", False, THREE_EXPERTS, True),  # query + visual terms only: the reduction ignores the prompt
    ("cotr", False, SQUARE_EXPERTS, False),  # query term only
    ("avg_pool", True, ((6, 10), (16, 16)), False),  # 4 x 4 token grids onto 2 x 2 cells
    ("avg_pool", True, ((6, 10), (36, 4)), False),  # 6 x 6 and 2 x 2 grids: cells of 3 x 3 and 1 x 1 tokens
    ("keep_all", True, ((6, 10), (9, 9)), False),
])
def test_ablation_modes_equal_torch_reference_and_change_the_output(mode, text_bias, experts, visual_bias):
    """text_bias=False / mode 'avg_pool' / 'keep_all' against the PyTorch reference (which pools with avg_pool2d),
    and each option gives a different output from CoTR as in the paper on the same inputs."""
    cfg = _mode_config(mode, text_bias, experts, visual_bias)
    module = _model(cfg)
    features, masks, text, text_mask = _inputs(cfg)
    ours = _run(module, features, masks, text, text_mask)
    theirs = _torch_output(module, features, masks, text, text_mask)
    diff = float(np.max(np.abs(ours.astype(np.float64) - theirs)))
    print(f"CoTR mode={mode} text_bias={text_bias} tokens={cfg.expert_tokens}: max abs diff vs torch {diff:.2e}")
    assert ours.shape == (4, cfg.output_tokens, sum(cfg.expert_widths))
    assert diff <= 1e-5
    assert np.all(ours[3] == 0), "a sample without image must give zeros"
    paper = _model(dataclasses.replace(cfg, mode="cotr", text_bias=True))
    if mode == "cotr":  # same weights but the prompt row: only the conditioning is gone
        nnx.update(paper, nnx.state(module))
        assert module.text_proj is None
    else:
        assert not nnx.state(module, nnx.Param), "fixed reductions have no parameters"
    paper_out = _run(paper, features, masks, text, text_mask)
    assert paper_out.shape != ours.shape or np.max(np.abs(paper_out - ours)) > 1e-2
    np.testing.assert_array_equal(_run(module, features, masks, text + 1.0, text_mask), ours)  # prompt-blind


def test_avg_pool_averages_each_cell_and_keep_all_passes_tokens_through():
    """Direct checks of the two fixed reductions: cell means of the 4 x 4 grid (valid tokens only) and identity."""
    cfg = _mode_config("avg_pool")
    features, masks, text, text_mask = _inputs(cfg)
    out = _run(CoTR(cfg, rngs=nnx.Rngs(0)), features, masks, text, text_mask)
    grid = features[1][0].reshape(2, 2, 2, 2, 10)  # sample 0 (all valid): [cell row, row, cell col, col, d]
    np.testing.assert_allclose(out[0, :, 6:], grid.mean(axis=(1, 3)).reshape(4, 10), atol=1e-6)
    weights = CoTR(cfg, rngs=nnx.Rngs(0)).attention([jnp.asarray(f) for f in features], jnp.asarray(text),
                                                    feature_masks=[jnp.asarray(m) for m in masks])
    assert np.all(np.asarray(weights[1])[2, :, 8:] == 0), "padding (second half of sample 2) must get weight 0"
    np.testing.assert_allclose(np.asarray(weights[1])[2, :2].sum(-1), 1.0, atol=1e-6)

    keep = _mode_config("keep_all", experts=((6, 10), (16, 16)))
    out = _run(CoTR(keep, rngs=nnx.Rngs(0)), features, masks, text, text_mask)
    np.testing.assert_array_equal(out[0], np.concatenate([features[0][0], features[1][0]], -1))
    assert keep.output_tokens == 16 and keep.forward_flops(6) == 0.0


def test_ablation_mode_errors_name_the_field():
    with pytest.raises(ValueError, match="config.cotr.mode='mean'"):
        _mode_config("mean")
    with pytest.raises(ValueError, match=r"mode='avg_pool'.*expert_tokens\[1\]=9 and num_queries=4"):
        _mode_config("avg_pool", experts=((6, 10), (16, 9)))
    with pytest.raises(ValueError, match=r"mode='keep_all'.*same token count.*\(16, 9\)"):
        _mode_config("keep_all", experts=((6, 10), (16, 9)))
    with pytest.raises(ValueError, match="no reduction weights"):
        cfg = _mode_config("keep_all", experts=((6, 10), (16, 16)))
        features, masks, text, _ = _inputs(cfg)
        CoTR(cfg, rngs=nnx.Rngs(0)).attention([jnp.asarray(f) for f in features], jnp.asarray(text))
