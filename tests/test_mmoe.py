"""MMoE: parity of a whole tiny LLM with LoRA experts against transformers + the PyTorch MMoE, balance loss on a
hand-made routing, gradients reaching the routers, and LoRA weights as their own variable type."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from leo_jax.convert.api import export_module
from leo_jax.layers.lora import LoRAParam
from leo_jax.models.llm.decoder import CausalLM, LLMConfig
from leo_jax.models.mmoe import MMoEConfig, RoutingContext, routing_gates, routing_stats
from leo_jax.pytorch.mmoe import MMoELinear, balance_loss

MMOE = dict(num_experts=3, rank=4, alpha=8.0, general_rank=2, general_alpha=2.0, top_k=1,
            targets=("q_proj", "down_proj"), router_hidden=16, router_cond_dim=8)


def _config(**mmoe):
    return LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     rms_norm_eps=1e-5, dtype="float32", mmoe=MMoEConfig(**{**MMOE, **mmoe}))


def _randomise_lora(model, seed=0):
    """LoRA B starts at zero; give every LoRA weight random values so the experts matter."""
    rng = np.random.RandomState(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        var.set_value(jnp.asarray(rng.normal(0, 0.3, var.get_value().shape), jnp.float32))


def _routing(batch, hidden, seed=1):
    rng = np.random.RandomState(seed)
    return RoutingContext(jnp.asarray(rng.normal(size=(batch, 1, hidden)), jnp.float32),
                          jnp.asarray(rng.normal(size=(batch, 1, hidden)), jnp.float32))


def _torch_reference(model: CausalLM, hf_dir):
    """LlamaForCausalLM with the exported base weights, whose q_proj/down_proj are MMoELinear modules holding the
    same LoRA/router weights, routed from each layer's input_layernorm output."""
    from transformers import LlamaForCausalLM

    cfg, mcfg = model.cfg, model.cfg.mmoe
    ref = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    params = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    t = lambda a: torch.tensor(np.ascontiguousarray(a))  # noqa: E731
    contexts = {}
    for i, layer in enumerate(ref.model.layers):
        owners = {"q_proj": layer.self_attn, "down_proj": layer.mlp}
        wrapped = {}
        for name, owner in owners.items():
            m = MMoELinear(getattr(owner, name), cfg.hidden_size, mcfg.num_experts, mcfg.rank, mcfg.alpha,
                           mcfg.general_rank, mcfg.general_alpha, mcfg.top_k, mcfg.router_cond_dim,
                           mcfg.router_hidden)
            pre = "layers/mmoe/"
            for sub in ("visual_proj", "prompt_proj", "fc1", "fc2"):
                getattr(m.router, sub).weight.data = t(params[f"{pre}router/{sub}/kernel"][i].T)
                getattr(m.router, sub).bias.data = t(params[f"{pre}router/{sub}/bias"][i])
            for kind, mod in (("experts", m.experts), ("general", m.general)):
                a, b = params[f"{pre}{kind}/{name}/lora_a"][i], params[f"{pre}{kind}/{name}/lora_b"][i]
                mod.lora_a.data = t(a.reshape(a.shape[0], cfg.hidden_size if name == "q_proj" else -1, a.shape[-1]))
                mod.lora_b.data = t(b.reshape(b.shape[0], b.shape[1], -1))
            setattr(owner, name, m)
            wrapped[name] = m
        layer.input_layernorm.register_forward_hook(_route_hook(wrapped, contexts))
    return ref, contexts


def _route_hook(wrapped, contexts):
    def hook(module, inputs, output):  # returns None: the norm's output is left unchanged
        for m in wrapped.values():
            m.set_routing(output, *contexts["ctx"])

    return hook


def test_llm_with_mmoe_matches_pytorch_reference(tmp_path):
    model = CausalLM(_config(), rngs=nnx.Rngs(0))
    _randomise_lora(model)
    export_module(model, "llama", tmp_path / "hf")
    ref, contexts = _torch_reference(model, tmp_path / "hf")
    ids = np.random.RandomState(2).randint(0, 64, (2, 11))
    routing = _routing(2, 32)
    contexts["ctx"] = (torch.tensor(np.asarray(routing.visual)), torch.tensor(np.asarray(routing.prompt)))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    out = model.forward(model.embed(jnp.asarray(ids)), routing=routing)
    diff = np.abs(np.asarray(out.out) - expected).max()
    print(f"MMoE LLM vs PyTorch reference: max abs logits diff = {diff:.2e}")
    assert diff <= 1e-5
    assert out.aux["expert_load"].shape == (2, 3) and out.aux["router_entropy"].shape == (2,)
    np.testing.assert_allclose(np.asarray(out.aux["expert_load"]).sum(-1), 1.0, atol=1e-6)


def test_zero_initialised_experts_leave_the_base_model_unchanged():
    model = CausalLM(_config(), rngs=nnx.Rngs(0))
    base = CausalLM(_config().replace(mmoe=None), rngs=nnx.Rngs(0))
    nnx.update(base, nnx.state(model, nnx.Not(nnx.Any(LoRAParam, nnx.PathContains("mmoe")))))
    ids = jnp.asarray(np.random.RandomState(3).randint(0, 64, (2, 9)))
    np.testing.assert_allclose(np.asarray(model.forward(model.embed(ids), routing=_routing(2, 32)).out),
                               np.asarray(base(ids)), atol=1e-6)


def test_balance_loss_on_hand_made_routing():
    probs = jnp.asarray([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.0, 1.0]]])
    mask = jnp.asarray([[True, True, True, True, False]])  # the last token is padding
    stats = routing_stats(probs, mask)
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    np.testing.assert_allclose(float(stats["balance_loss"]), 1.15, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["expert_load"]), [0.75, 0.25])
    torch_value = balance_loss(torch.tensor(np.asarray(probs)), torch.tensor(np.asarray(mask)))
    np.testing.assert_allclose(float(torch_value), 1.15, rtol=1e-6)
    uniform = routing_stats(jnp.full((1, 4, 4), 0.25), jnp.ones((1, 4), bool))
    np.testing.assert_allclose(float(uniform["router_entropy"]), np.log(4), rtol=1e-5)


@pytest.mark.parametrize("gate_mode", ["prob", "straight_through"])
def test_gradients_reach_the_router(gate_mode):
    model = CausalLM(_config(gate_mode=gate_mode), rngs=nnx.Rngs(0))
    _randomise_lora(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.asarray(np.random.RandomState(4).randint(0, 64, (2, 7)))

    def loss(params):
        out = nnx.merge(graphdef, params, rest).forward(nnx.merge(graphdef, params, rest).embed(ids),
                                                       routing=_routing(2, 32))
        return jnp.mean(out.out ** 2) + 0.05 * jnp.mean(out.aux["balance_loss"])

    grads = jax.jit(jax.grad(loss))(params)
    flat = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    for name in ("router/fc1/kernel", "router/fc2/kernel", "router/visual_proj/kernel", "router/prompt_proj/kernel",
                 "experts/down_proj/lora_a", "general/q_proj/lora_b"):
        assert np.abs(flat[f"layers/mmoe/{name}"]).max() > 0, name


def test_straight_through_gates_are_hard_forward():
    probs = jnp.asarray([[[0.2, 0.5, 0.3]]])
    cfg = MMoEConfig.from_config(dict(num_experts=3, gate_mode="straight_through"))
    np.testing.assert_allclose(np.asarray(routing_gates(probs, cfg)), [[[0.0, 1.0, 0.0]]], atol=1e-7)
    prob_cfg = MMoEConfig.from_config(dict(num_experts=3, top_k=2, renormalize=True))
    np.testing.assert_allclose(np.asarray(routing_gates(probs, prob_cfg)), [[[0.0, 0.625, 0.375]]], atol=1e-6)


def test_lora_weights_are_their_own_variable_type():
    model = CausalLM(_config(), rngs=nnx.Rngs(0))
    lora_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, LoRAParam))}
    assert lora_paths == {f"layers/mmoe/{k}/{t}/lora_{ab}" for k in ("experts", "general")
                          for t in ("q_proj", "down_proj") for ab in "ab"}
    with pytest.raises(ValueError, match=r"mmoe.targets=\('fc9',\)"):
        _config(targets=("fc9",))
    with pytest.raises(ValueError, match="needs RoutingContext"):
        CausalLM(_config(), rngs=nnx.Rngs(0))(jnp.zeros((1, 3), jnp.int32))
