"""LLM family: logits parity with transformers, conversion round trips, KV cache, padding, packing and sharding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from hf_fixtures import LLAMA2, LLAMA3, LLAMA_GQA_BIAS, QWEN2, internlm2_from_llama, save_hf_model
from leo_jax.convert import ConversionError, export_hf, import_hf, load_hf
from leo_jax.infer.generate import SamplingConfig, generate, left_pad
from leo_jax.models.llm.decoder import CausalLM, LLMConfig
from sharding_utils import assert_sharded_matches

VARIANTS = {"llama2": ("llama", LLAMA2), "llama3": ("llama", LLAMA3), "qwen2": ("qwen2", QWEN2)}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (torch model, HF dir): Llama 2, Llama 3 (GQA + rope scaling), Qwen2 (q/k/v biases, tied embeddings),
    InternLM2 layout (GQA, fused wqkv with bias) whose reference is a LlamaForCausalLM with the same weights."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (kind, kwargs) in VARIANTS.items():
        out[name] = (save_hf_model(kind, kwargs, root / name, seed=len(out)), root / name)
    reference = save_hf_model("llama", LLAMA_GQA_BIAS, root / "llama_gqa_bias", seed=9)
    internlm2_from_llama(reference, root / "internlm2", bias=True)
    out["internlm2"] = (reference, root / "internlm2")
    return out


def _ids(batch=2, length=37, vocab=128, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("name", ["llama2", "llama3", "qwen2", "internlm2"])
def test_logits_match_transformers(hf_models, name):
    torch_model, path = hf_models[name]
    ids = _ids()
    with torch.no_grad():
        reference = torch_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    model = load_hf(path)
    diff = np.abs(np.asarray(model(jnp.asarray(ids))) - reference).max()
    print(f"{name}: max abs logits diff vs transformers = {diff:.2e}")
    assert diff <= 1e-4


def test_llama3_rope_scaling_is_active(hf_models):
    """The scaled frequencies matter at this length: dropping the scaling must change the logits."""
    torch_model, path = hf_models["llama3"]
    model = load_hf(path)
    assert model.cfg.rope_scaling["rope_type"] == "llama3"
    plain = nnx.merge(*nnx.split(model))
    plain.cfg = model.cfg.replace(rope_scaling=None)
    ids = jnp.asarray(_ids())
    assert np.abs(np.asarray(model(ids)) - np.asarray(plain(ids))).max() > 1e-3


@pytest.mark.parametrize("name", ["llama2", "llama3", "qwen2", "internlm2"])
def test_hf_round_trip_is_bit_identical(hf_models, name, tmp_path):
    _, path = hf_models[name]
    import_hf(path, tmp_path / "leo")
    export_hf(tmp_path / "leo", tmp_path / "hf")
    files = sorted(p.name for p in tmp_path.joinpath("hf").glob("*.safetensors"))
    assert files == ["model.safetensors"]
    with safe_open(path / "model.safetensors", "pt") as a, safe_open(tmp_path / "hf/model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and torch.equal(x, y), key
    original = json.loads((path / "config.json").read_text())
    exported = json.loads((tmp_path / "hf/config.json").read_text())
    fields = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "rope_parameters", "rope_theta", "rope_scaling",
              "bias", "attention_bias", "architectures", "auto_map"]
    for field in fields:
        assert exported.get(field) == original.get(field), field


def test_bf16_and_sharded_round_trip(hf_models, tmp_path):
    """A bf16 checkpoint split over several shards with an index file round-trips bit for bit."""
    from leo_jax.convert.api import export_module

    _, path = hf_models["llama3"]
    model = load_hf(path)
    export_module(model, "llama", tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "bf16/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    import_hf(tmp_path / "bf16", tmp_path / "leo")
    export_hf(tmp_path / "leo", tmp_path / "again", max_shard_bytes=40_000)
    assert json.loads((tmp_path / "again/model.safetensors.index.json").read_text()) == index
    for shard in shards:
        with safe_open(tmp_path / "bf16" / shard, "pt") as a, safe_open(tmp_path / "again" / shard, "pt") as b:
            for key in a.keys():
                assert a.get_tensor(key).dtype == torch.bfloat16
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


@pytest.fixture(scope="module")
def tiny_model():
    cfg = LLMConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6, num_kv_heads=2,
                    rope_theta=10000.0, dtype="float32")
    return CausalLM(cfg, rngs=nnx.Rngs(3))


def test_kv_cache_greedy_equals_full_forward_argmax(tiny_model):
    prompt = _ids(batch=1, length=7, vocab=97, seed=4)
    new = generate(tiny_model, prompt, sampling=SamplingConfig(max_new_tokens=9))
    seq = prompt
    for _ in range(9):
        nxt = np.asarray(jnp.argmax(tiny_model(jnp.asarray(seq))[:, -1], -1)).astype(np.int32)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(new, seq[:, 7:])


def test_left_padded_batch_equals_each_sample_alone(tiny_model):
    prompts = [list(_ids(1, n, 97, seed=n)[0]) for n in (3, 8, 5)]
    ids, seg = left_pad(prompts, pad_id=0)
    batched = generate(tiny_model, ids, seg, SamplingConfig(max_new_tokens=6))
    for i, p in enumerate(prompts):
        alone = generate(tiny_model, np.asarray([p], np.int32), sampling=SamplingConfig(max_new_tokens=6))
        np.testing.assert_array_equal(batched[i], alone[0])
    # also the prefill logits themselves, without generation
    full = np.asarray(tiny_model(jnp.asarray(ids), segment_ids=jnp.asarray(seg)))
    for i, p in enumerate(prompts):
        alone = np.asarray(tiny_model(jnp.asarray([p], jnp.int32)))[0]
        np.testing.assert_allclose(full[i, -len(p):], alone, atol=1e-5)


def test_packed_row_equals_samples_alone(tiny_model):
    samples = [_ids(1, n, 97, seed=10 + n)[0] for n in (5, 9, 4)]
    row = np.concatenate(samples + [np.zeros(3, np.int32)])[None]
    seg = np.concatenate([np.full(len(s), i + 1) for i, s in enumerate(samples)] + [np.zeros(3)])[None].astype(np.int32)
    packed = np.asarray(tiny_model(jnp.asarray(row), segment_ids=jnp.asarray(seg)))[0]
    start = 0
    for s in samples:
        alone = np.asarray(tiny_model(jnp.asarray(s[None])))[0]
        np.testing.assert_allclose(packed[start:start + len(s)], alone, atol=1e-5)
        start += len(s)


def test_sampling_is_seeded_and_respects_eos(tiny_model):
    prompt = _ids(batch=2, length=5, vocab=97, seed=1)
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9)
    a = generate(tiny_model, prompt, sampling=cfg, rng=jax.random.key(1))
    b = generate(tiny_model, prompt, sampling=cfg, rng=jax.random.key(1))
    c = generate(tiny_model, prompt, sampling=cfg, rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    eos = int(a[0, 3])
    stopped = generate(tiny_model, prompt, sampling=SamplingConfig(12, 1.0, 0.9, eos_ids=(eos,), pad_id=-1),
                       rng=jax.random.key(1))
    first = list(stopped[0]).index(eos)
    assert (stopped[0, first + 1:] == -1).all()


def test_top_p_keeps_only_the_nucleus():
    from leo_jax.infer.generate import sample_token

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_token(logits, jax.random.key(i), 1.0, 0.75)[0]) for i in range(200)}
    assert draws == {0, 1}


def test_sharded_forward_matches_single_device(tiny_model):
    ids = _ids(batch=8, length=16, vocab=97, seed=2)
    worst = assert_sharded_matches(tiny_model, lambda m, x: m(x), (ids,))
    print(f"sharded vs single-device max abs diff = {worst:.2e}")


def test_clear_errors_for_bad_checkpoints(hf_models, tmp_path):
    import shutil

    _, path = hf_models["llama2"]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    config = json.loads((bad / "config.json").read_text())

    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(ConversionError, match="unknown model_type 'gpt_neox'"):
        load_hf(bad)

    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(ConversionError, match=r"mlp.gate_proj.weight.*shape"):
        load_hf(bad)

    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="config.json is not valid JSON"):
        load_hf(bad)

    (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ConversionError, match=r"missing tensor 'model.layers.2"):
        load_hf(bad)


def test_generation_compiles_for_configs_with_dict_fields():
    """Configs holding dicts (rope scaling, MMoE, LEO sections) are part of the static graph of the jitted decode."""
    cfg = LLMConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                    dtype="float32", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    assert hash(cfg) == hash(cfg.replace())
    out = generate(model, _ids(batch=2, length=5, vocab=97), sampling=SamplingConfig(max_new_tokens=3))
    assert out.shape == (2, 3)
