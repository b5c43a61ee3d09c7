"""LEO whole-model export in the official LEO layout: the PyTorch LEO (leo_jax.pytorch.leo) loading the exported
safetensors strictly reproduces the JAX logits for images + text; export -> import is bit-identical (also from the
official config fields alone); each component directory loads in transformers with equal outputs; clear errors."""

import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from leo_jax import convert
from leo_jax.config import load_config
from leo_jax.convert import leo as leo_convert
from leo_jax.convert.api import abstract_model, module_from_params
from leo_jax.convert.core import ConversionError, export_tensors, get_family
from leo_jax.convert.leo import export_components
from leo_jax.data.image_processing import get_preprocessor
from leo_jax.models.registry import model_config
from leo_jax.pytorch.leo import InternLM2ForCausalLM, LeoModel

TOL = 1e-4
SLOTS = 2  # tile slots per row; row 1 leaves its second slot masked


def _random_params(cfg, seed=0) -> dict:
    """Every parameter non-trivial: norm scales and layer scales around 1 / 0.1, everything else N(0, 0.05) (biases
    and zero-initialised embeddings included), so no mapping can pass by accident."""
    rng = np.random.default_rng(seed)
    state = nnx.state(abstract_model(get_family("leo"), cfg), nnx.Param)
    out = {}
    for path, var in nnx.to_flat_state(state):
        name, shape = "/".join(map(str, path)), var.get_value().shape
        noise = rng.normal(size=shape).astype(np.float32)
        if name.endswith("scale"):
            out[name] = 1.0 + 0.1 * noise
        elif name.endswith(("ls1", "ls2")):
            out[name] = 0.1 + 0.05 * noise
        else:
            out[name] = 0.05 * noise
    return out


def _random_model(cfg):
    return module_from_params(get_family("leo"), cfg, {k: jnp.asarray(v) for k, v in _random_params(cfg).items()})


@pytest.fixture(scope="module")
def leo():
    """(config, tiny LEO (InternLM2 LLM) with random weights)."""
    config = load_config("tiny_leo")
    return config, _random_model(model_config(config.model))


@pytest.fixture(scope="module")
def exported(leo, tmp_path_factory):
    return convert.export_module(leo[1], "leo", tmp_path_factory.mktemp("leo") / "hf")


def _batch(config, seed=0):
    """Two rows: row 0 two tiles (64 <IMG_CONTEXT>), row 1 one tile and a masked slot (32); text around them,
    right padding. Returns (JAX batch, token lengths)."""
    rng = np.random.default_rng(seed)
    ctx, per_tile, tile = config.model.image_context_id, 32, config.model.intern_vit.image_size
    length = 100
    ids = np.zeros((2, length), np.int32)
    lengths = []
    for row, (n_tiles, before, after) in enumerate([(2, 6, 20), (1, 4, 41)]):
        text = rng.integers(20, config.model.llm.vocab_size, size=before + after)
        row_ids = np.concatenate([[1], text[:before], np.full(n_tiles * per_tile, ctx), text[before:]])
        ids[row, :len(row_ids)] = row_ids
        lengths.append(len(row_ids))
    segment_ids = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    tiles = rng.integers(0, 256, size=(2, SLOTS, tile, tile, 3), dtype=np.uint8)
    batch = dict(input_ids=ids, segment_ids=segment_ids, positions=np.broadcast_to(np.arange(length), ids.shape),
                 tiles=tiles, sam_tiles=tiles, tile_mask=np.asarray([[True, True], [True, False]]))
    return {k: jnp.asarray(v) for k, v in batch.items()}, lengths


def _normalised(pre, pixels_uint8) -> torch.Tensor:
    """uint8 HWC tiles -> the official model's input: (x / 255 - mean) / std, NCHW float32."""
    x = (np.asarray(pixels_uint8, np.float64) / 255 - np.asarray(pre.mean)) / np.asarray(pre.std)
    return torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2).contiguous()


def _torch_inputs(config, cfg, batch) -> dict:
    """The official LeoModel inputs for the same batch: every slot's tile, SAM input made on the host with PIL."""
    tiles = np.asarray(batch["tiles"]).reshape(-1, *batch["tiles"].shape[2:])
    intern_pre = get_preprocessor("intern_vit", size=tiles.shape[1])
    sam_pre = get_preprocessor("sam", longest_edge=cfg.sam.image_size)
    return dict(pixel_values=_normalised(intern_pre, tiles),
                pixel_values_sam=_normalised(sam_pre, np.stack([sam_pre.host(t) for t in tiles])),
                input_ids=torch.from_numpy(np.array(batch["input_ids"])).long(),
                image_flags=torch.from_numpy(np.asarray(batch["tile_mask"]).reshape(-1).astype(np.int64)),
                attention_mask=torch.from_numpy(np.array(batch["segment_ids"])).long())


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


_forward = nnx.jit(lambda m, b: m.train_forward(b).out)  # one jitted function: same shapes compile once


def _jax_logits(model, batch):
    return np.asarray(_forward(model, batch))


def _assert_torch_matches_jax(config, model, hf_dir, what):
    batch, lengths = _batch(config)
    jax_logits = _jax_logits(model, batch)
    torch_model = LeoModel.from_pretrained(hf_dir)  # load_state_dict(strict=True) under the official names
    with torch.no_grad():
        torch_logits = torch_model(**_torch_inputs(config, model.cfg, batch)).numpy()
    diffs = [_max_diff(torch_logits[r, :n], jax_logits[r, :n]) for r, n in enumerate(lengths)]
    print(f"{what}: PyTorch vs JAX logits max abs diff {max(diffs):.2e} (per row {[f'{d:.1e}' for d in diffs]}; "
          f"logits up to {np.abs(jax_logits).max():.2f})")
    assert max(diffs) <= TOL
    return batch, lengths, jax_logits


def test_pytorch_leo_reproduces_jax_logits(leo, exported):
    config, model = leo
    batch, lengths, jax_logits = _assert_torch_matches_jax(config, model, exported, "LEO (InternLM2)")
    # the visual tokens matter: other tile pixels change the text positions after the images
    other = {**batch, "tiles": batch["tiles"][:, ::-1], "sam_tiles": batch["sam_tiles"][:, ::-1]}
    changed = _jax_logits(model, other)
    assert _max_diff(changed[0, :lengths[0]], jax_logits[0, :lengths[0]]) > 100 * TOL


def test_pytorch_leo_with_a_transformers_llm(leo, tmp_path):
    """The InternVL-style variant: a Qwen2 LLM (q/k/v biases) under language_model.* in transformers' names."""
    config, model = leo
    llm = dataclasses.replace(model.cfg.llm, family="qwen2", qkv_bias=True, rope_scaling=None)
    qwen = _random_model(dataclasses.replace(model.cfg, llm=llm))
    out = convert.export_module(qwen, "leo", tmp_path / "qwen")
    assert json.loads((out / "config.json").read_text())["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert "language_model.model.layers.0.self_attn.q_proj.bias" in load_file(out / "model.safetensors")
    _assert_torch_matches_jax(config, qwen, out, "LEO (Qwen2)")


def test_export_names_and_config_are_the_official_layout(leo, exported):
    hf = json.loads((exported / "config.json").read_text())
    assert hf["model_type"] == "hybrid_chat" and hf["architectures"] == ["LeoModel"]
    assert hf["vision_config_1"]["model_type"] == "intern_vit_6b"
    assert hf["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
    assert (hf["downsample_ratio"], hf["downsample_ratio2"], hf["ps_version"]) == (0.5, 2, "v2")
    assert hf["img_context_token_id"] == leo[0].model.image_context_id and hf["num_image_token"] == 32
    names = set(load_file(exported / "model.safetensors"))
    for name in ("vision_model_1.encoder.layers.0.attn.qkv.weight", "vision_model_1.encoder.layers.1.ls2",
                 "vision_model_2.layers.1.attn.rel_pos_h", "vision_model_2.neck.conv2.weight",
                 "vision_model_2.pos_embed", "mlp1.0.weight", "mlp1.1.bias", "mlp2.3.weight",
                 "language_model.model.tok_embeddings.weight", "language_model.model.layers.1.attention.wqkv.weight",
                 "language_model.model.layers.0.feed_forward.w3.weight", "language_model.output.weight"):
        assert name in names, name
    assert {n.split(".")[0] for n in names} == {"vision_model_1", "vision_model_2", "mlp1", "mlp2", "language_model"}


def _assert_same_params(a, b):
    flat_a = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(a, nnx.Param))}
    flat_b = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(b, nnx.Param))}
    assert sorted(flat_a) == sorted(flat_b)
    for path, value in flat_a.items():
        assert value.dtype == flat_b[path].dtype, path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]), err_msg=str(path))


def test_export_import_is_bit_identical(leo, exported, tmp_path):
    _, model = leo
    back = convert.load_hf(exported)
    assert back.cfg == model.cfg
    _assert_same_params(model, back)
    # an official LEO config.json (no "leo_jax" block) rebuilds the same model from the official fields
    hf = json.loads((exported / "config.json").read_text())
    del hf["leo_jax"]
    official = tmp_path / "official"
    shutil.copytree(exported, official)
    (official / "config.json").write_text(json.dumps(hf))
    from_official = convert.load_hf(official)
    assert from_official.cfg == model.cfg
    _assert_same_params(model, from_official)


def test_bf16_export_round_trip(leo, tmp_path):
    _, model = leo
    out = convert.export_module(model, "leo", tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").is_file()  # sharded, as save_pretrained does for large models
    back = dict(nnx.to_flat_state(nnx.state(convert.load_hf(out, param_dtype="bfloat16"), nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = back[path].get_value()
        assert value.dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(var.get_value().astype(jnp.bfloat16)))


def _llama_from_internlm2(llm_dir):
    """transformers LlamaForCausalLM holding an InternLM2-layout directory's weights (wqkv split per KV group):
    the independent reference for the InternLM2 layout (RoPE dynamic scaling is inactive at these lengths)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = json.loads((llm_dir / "config.json").read_text())
    heads, kv, e = hf["num_attention_heads"], hf["num_key_value_heads"], hf["hidden_size"]
    d, g = e // heads, heads // kv
    config = LlamaConfig(vocab_size=hf["vocab_size"], hidden_size=e, intermediate_size=hf["intermediate_size"],
                         num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
                         num_key_value_heads=kv, rms_norm_eps=hf["rms_norm_eps"],
                         max_position_embeddings=hf["max_position_embeddings"],
                         rope_parameters={"rope_type": "default", "rope_theta": hf["rope_theta"]})
    sd = load_file(llm_dir / "model.safetensors")
    out = {"model.embed_tokens.weight": sd["model.tok_embeddings.weight"], "model.norm.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        qkv = sd[p + "attention.wqkv.weight"].reshape(kv, g + 2, d, e)
        out[p + "self_attn.q_proj.weight"] = qkv[:, :g].reshape(-1, e)
        out[p + "self_attn.k_proj.weight"] = qkv[:, g].reshape(-1, e)
        out[p + "self_attn.v_proj.weight"] = qkv[:, g + 1].reshape(-1, e)
        out[p + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        for ours, theirs in (("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
                             ("feed_forward.w2", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
                             ("ffn_norm", "post_attention_layernorm")):
            out[p + theirs + ".weight"] = sd[p + ours + ".weight"]
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(out, strict=True)
    return model, hf


def test_components_load_in_transformers(leo, tmp_path):
    from transformers import InternVLVisionModel, SamVisionModel

    _, model = leo
    dirs = export_components(model, tmp_path)
    assert sorted(dirs) == ["intern_vit", "llm", "sam"]

    ids = np.random.default_rng(1).integers(0, model.cfg.llm.vocab_size, size=(2, 23)).astype(np.int32)
    jax_logits = np.asarray(model.llm(jnp.asarray(ids)))
    llama, llm_hf = _llama_from_internlm2(dirs["llm"])
    ours = InternLM2ForCausalLM(llm_hf)
    ours.load_state_dict(load_file(dirs["llm"] / "model.safetensors"), strict=True)
    with torch.no_grad():
        llama_logits = llama(torch.from_numpy(ids).long()).logits.numpy()
        ours_logits = ours(torch.from_numpy(ids).long()).numpy()
    diffs = {"llm jax": _max_diff(jax_logits, llama_logits),
             "llm torch InternLM2": _max_diff(ours_logits, llama_logits)}

    pixels = np.random.default_rng(2).normal(size=(2, 56, 56, 3)).astype(np.float32)
    intern = InternVLVisionModel.from_pretrained(dirs["intern_vit"]).eval()
    with torch.no_grad():
        intern_out = intern(torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    diffs["intern_vit"] = _max_diff(np.asarray(model.intern_vit(jnp.asarray(pixels))), intern_out)

    sam_pixels = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype(np.float32)
    sam = SamVisionModel.from_pretrained(dirs["sam"]).eval()
    with torch.no_grad():
        sam_out = sam(torch.from_numpy(sam_pixels).permute(0, 3, 1, 2)).last_hidden_state.permute(0, 2, 3, 1)
    diffs["sam"] = _max_diff(np.asarray(model.sam(jnp.asarray(sam_pixels))), sam_out.numpy())
    print("components vs transformers, max abs diff:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL


def test_clear_errors(leo, exported, tmp_path):
    config, model = leo
    broken = tmp_path / "missing"
    shutil.copytree(exported, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["mlp2.1.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing tensor 'mlp2.1.weight' \(needed for leo_jax parameter "
                                              r"projector_sam/mlp/fc1/kernel\)"):
        convert.load_hf(broken)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*mlp2\.1\.weight"):
        LeoModel.from_pretrained(broken)

    hf = json.loads((exported / "config.json").read_text())
    for name, change, message in [
            ("wrong_type", {"model_type": "internvl_chat"}, r"unknown model_type 'internvl_chat'"),
            ("disagree", {"downsample_ratio2": 4}, r"downsample_ratio2=4 disagrees with leo_jax \(2\)"),
            ("no_llm", {"leo_jax": None, "llm_config": None}, r"has no 'llm_config' object"),
            ("phi3", {"leo_jax": None, "llm_config": {**hf["llm_config"], "architectures": ["Phi3ForCausalLM"]}},
             r"llm_config.architectures\[0\]='Phi3ForCausalLM' is not supported")]:
        bad = tmp_path / name
        shutil.copytree(exported, bad)
        edited = {k: v for k, v in {**hf, **change}.items() if v is not None}
        (bad / "config.json").write_text(json.dumps(edited))
        with pytest.raises(ConversionError, match=message):
            convert.load_hf(bad)

    no_norm = dataclasses.replace(model.cfg, projector=dataclasses.replace(model.cfg.projector, layer_norm=False))
    with pytest.raises(ConversionError, match=r"official LEO layout has LayerNorm"):
        get_family("leo").rules(no_norm)

    torch_model = LeoModel.from_pretrained(exported)
    batch, _ = _batch(config)
    inputs = _torch_inputs(config, model.cfg, batch)
    inputs["image_flags"] = torch.tensor([1, 1, 1, 1])  # the masked slot claimed as real: 32 tokens too many
    with pytest.raises(ValueError, match=r"input_ids hold 96 <IMG_CONTEXT> tokens but the tiles give 128 visual"):
        torch_model(**inputs)


def _upstream_sizes(hf: dict) -> dict:
    """The official LEO code's own sizing of what the config.json builds (its LeoModel.__init__ and MLP)."""
    v1, v2, ratio = hf["vision_config_1"], hf["vision_config_2"], hf["downsample_ratio"]
    size = hf["force_image_size"] or v1["image_size"]
    return dict(mlp1_in=v1["hidden_size"] * int(1 / ratio) ** 2, mlp2_in=v1["hidden_size"] * int(1 / ratio) ** 2,
                num_image_token=int((size // v1["patch_size"]) ** 2 * (ratio ** 2)) * 2,
                sam_tokens=2 * (v2["image_size"] // v2["patch_size"] // int(hf["downsample_ratio2"])) ** 2)


def _exported_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} the exporter writes for `cfg`, without allocating the weights (np.empty pages that are
    never written stay virtual; each tensor is converted and dropped in turn)."""
    fam = get_family("leo")
    state = nnx.state(abstract_model(fam, cfg), nnx.Param)
    params = {"/".join(map(str, p)): np.empty(v.get_value().shape, np.int8) for p, v in nnx.to_flat_state(state)}
    return {name: tuple(a.shape) for name, a in export_tensors(fam, cfg, params)}


@pytest.mark.parametrize("preset", ["tiny_leo", "leo_8b"])
def test_every_leo_preset_exports_a_config_the_official_code_builds(preset):
    """On the exported config.json alone: the official sizing rules hold (mlp2's input = mlp1's, num_image_token =
    tokens per tile = SAM's), every field it reads is explicit, and leo_jax.pytorch.LeoModel built from it (meta
    device, no memory) loads the exported names and shapes strictly; the image-context id is a real token of the LLM
    (leo_8b: 92546, after InternLM2-chat's 92,544 tokens, <img> and </img>)."""
    config = load_config(preset)
    cfg = model_config(config.model)
    hf = json.loads(json.dumps(leo_convert.config_to_hf(cfg, leo_convert.data_fields(config.data))))
    sizes = _upstream_sizes(hf)
    llm_width = hf["llm_config"]["hidden_size"]
    assert sizes["mlp2_in"] == hf["vision_config_2"]["output_channels"] * hf["downsample_ratio2"] ** 2
    assert sizes["num_image_token"] == sizes["sam_tokens"] == hf["num_image_token"] == cfg.tokens_per_tile()
    assert hf["vision_config_1"]["use_flash_attn"] is False and hf["llm_config"]["attn_implementation"] == "eager"
    assert hf["template"] == "internlm2-chat" and hf["system_message"].startswith("You are LEO")
    assert "drop_path_rate" in hf["vision_config_1"] and hf["select_layer"] == -1 and hf["ps_version"] == "v2"
    assert leo_convert.upstream_problems(hf) == []
    assert 0 <= hf["img_context_token_id"] < hf["llm_config"]["vocab_size"]
    if preset == "leo_8b":
        assert (hf["img_context_token_id"], hf["llm_config"]["vocab_size"]) == (92546, 92553)
    with torch.device("meta"):
        torch_model = LeoModel(hf)
    assert tuple(torch_model.mlp2[1].weight.shape) == (llm_width, sizes["mlp2_in"])
    shapes = _exported_shapes(cfg)
    missing, unexpected = torch_model.load_state_dict(
        {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}, strict=True, assign=True)
    assert not missing and not unexpected


def test_official_sizing_rule_is_checked(leo):
    """The previous tiny preset (SAM neck 32 channels: mlp2 input 128, official 256) is named field by field."""
    config, model = leo
    cfg = dataclasses.replace(model.cfg, sam=dataclasses.replace(model.cfg.sam, output_channels=32))
    problems = leo_convert.upstream_problems(leo_convert.config_to_hf(cfg, {}))
    assert len(problems) == 1
    assert "vision_config_2.output_channels=32 x downsample_ratio2=2^2 = 128" in problems[0]
    assert "vision_config_1.hidden_size=64 x (1 / downsample_ratio=0.5)^2 = 256" in problems[0]
    qwen = dataclasses.replace(model.cfg, llm=dataclasses.replace(model.cfg.llm, family="qwen2", qkv_bias=True))
    assert "llm_config.architectures[0]='Qwen2ForCausalLM'" in leo_convert.upstream_problems(
        leo_convert.config_to_hf(qwen, {}))[0]
