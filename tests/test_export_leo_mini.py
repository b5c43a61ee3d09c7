"""LEO-MINI whole-model export: the PyTorch LEO-MINI loading the export reproduces the JAX logits on a real
multimodal batch (routing active, LoRA B non-zero), export -> import is bit-identical, the torch model trains
(finite gradients on LoRA / routers / CoTR), each component loads alone in transformers, and bad inputs fail clearly.
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from leo_jax.config import load_config
from leo_jax.convert import api
from leo_jax.convert.core import ConversionError, get_family
from leo_jax.convert.leo_mini import export_components
from leo_jax.data import pipeline, synthetic, visual
from leo_jax.data.image_processing import get_preprocessor
from leo_jax.models.leo_mini import PATCH_INPUT_KINDS, expert_pixels
from leo_jax.models.registry import model_config
from leo_jax.pytorch.leo_mini import LeoMiniForCausalLM, eva_from_config

TOL = 1e-4


def random_model(cfg, seed=0, std=0.05):
    """The model with every parameter drawn at random (norm scales around 1, everything else N(0, std^2), LoRA B
    included), built around numpy arrays: no initialiser runs, and no parameter keeps a value that could hide a
    conversion mistake (zeros, ones)."""
    graphdef, state = nnx.split(api.abstract_model(get_family("leo_mini"), cfg))
    rng = np.random.RandomState(seed)
    values = []
    for path, var in nnx.to_flat_state(state):
        noise = rng.normal(0.0, std, var.get_value().shape)
        value = noise + 1.0 if path[-1] == "scale" else noise
        values.append((path, var.replace(jnp.asarray(value, var.get_value().dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def config_with(cfg, **changes):
    """A LeoMiniConfig with some fields changed (experts, llm, ...)."""
    fields = {"experts": list(cfg.experts), "llm": cfg.llm, "cotr": cfg.cotr, "projector": cfg.projector,
              "image_context_id": cfg.image_context_id, **changes}
    return model_config({"kind": "leo_mini", **fields})


def flat_params(model):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def torch_inputs(model, batch):
    """The torch forward's arguments for a leo_jax batch: each expert's encoder inputs (normalised NCHW pixels,
    Pix2Struct patches + mask), attention / prompt / image masks, and the answer tokens (the batch's loss_mask marks
    the token before each supervised target)."""
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    images, patch_masks = {}, {}
    for spec in model.specs:
        x = batch[spec.batch_key]
        if spec.kind in PATCH_INPUT_KINDS:
            images[spec.name], patch_masks[spec.name] = t(x), t(batch[f"patch_mask_{spec.name}"])
        else:
            images[spec.name] = t(expert_pixels(spec, x)).permute(0, 1, 4, 2, 3)
    answers = np.pad(np.asarray(batch["loss_mask"])[:, :-1] > 0, ((0, 0), (1, 0))) if "loss_mask" in batch else None
    return dict(input_ids=t(batch["input_ids"]).long(), images=images, patch_masks=patch_masks,
                attention_mask=t(batch["segment_ids"] > 0), prompt_mask=t(batch["prompt_mask"]),
                image_mask=t(batch["image_mask"]), answer_mask=None if answers is None else t(answers))


def compare_logits(model, batch, torch_model, return_logits=False):
    """Max |JAX - PyTorch| logit over the real tokens, and the torch routers' top-1 choices there (and the torch
    logits with `return_logits`)."""
    graphdef, state = nnx.split(model)
    expected = np.asarray(jax.jit(lambda s, b: nnx.merge(graphdef, s).train_forward(b).out)(state, batch))
    inputs = torch_inputs(model, batch)
    with torch.no_grad():
        got = torch_model(**inputs).logits.numpy()
    real = np.asarray(batch["segment_ids"]) > 0
    choices = [p.argmax(-1).numpy()[real] for p in torch_model.router_probs()]
    return (float(np.abs(got - expected)[real].max()), choices) + ((got,) if return_logits else ())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny_leo_mini (CLIP + ConvNeXt) with random parameters, exported; one batch from the real data pipeline."""
    work = tmp_path_factory.mktemp("leo_mini")
    synthetic.write_dataset(work / "data", 4, seed=0, val_num=1, multi_turn_fraction=0.0,
                            multi_image_fraction=0.0, text_only_fraction=0.0)
    config = load_config("tiny_leo_mini")
    config.data.update(train_files=str(work / "data" / "data.json"), global_batch_size=2, shuffle=False)
    iterator = pipeline.make_train_iterator(config.data, visual.for_config(config), process_index=0, process_count=1)
    batch = {k: jnp.asarray(v) for k, v in next(iter(iterator)).items() if k != "sample_index"}
    model = random_model(model_config(config.model))
    out = api.export_module(model, "leo_mini", work / "hf")
    return model, batch, out, work


def test_pytorch_leo_mini_reproduces_jax_logits(tiny):
    model, batch, out, _ = tiny
    assert int(np.sum(np.asarray(batch["input_ids"]) == model.cfg.image_context_id)) == 2 * 16  # a real image each
    torch_model = LeoMiniForCausalLM.from_pretrained(out)
    diff, choices = compare_logits(model, batch, torch_model)
    print(f"LEO-MINI (CLIP + ConvNeXt) PyTorch vs JAX: max abs logits diff = {diff:.2e}")
    assert diff <= TOL
    assert any(len(np.unique(c)) > 1 for c in choices), "routing picked one expert everywhere: not exercised"


def test_export_then_import_is_bit_identical(tiny):
    """Single-file and sharded exports (index + shards) import back to the same parameters, bit for bit, as a module
    (load_hf) and through a leo_jax checkpoint (import_hf -> load_leo)."""
    model, _, out, work = tiny
    assert json.loads((out / "config.json").read_text())["model_type"] == "leo_mini"
    sharded = api.export_module(model, "leo_mini", work / "sharded", max_shard_bytes=400_000)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*"))) > 2
    before = flat_params(model)
    checkpoint = api.import_hf(sharded, work / "checkpoint")
    for module in (api.load_hf(out), api.load_hf(sharded), api.load_leo(checkpoint)):
        after = flat_params(module)
        assert sorted(before) == sorted(after)
        for name, value in before.items():
            assert after[name].dtype == value.dtype, name
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    single, split = (LeoMiniForCausalLM.from_pretrained(d).state_dict() for d in (out, sharded))
    assert all(torch.equal(single[k], split[k]) for k in single)


def test_tensor_names_follow_the_documented_layout(tiny):
    names = set(load_file(tiny[2] / "model.safetensors"))
    layer = "language_model.model.layers.1.mlp.down_proj."
    for name in ("vision_experts.clip.embeddings.patch_embedding.weight",
                 "vision_experts.convnext.encoder.stages.1.layers.0.dwconv.weight",
                 "cotr.experts.1.query", "cotr.text_proj.weight", "projector.0.weight", "projector.2.bias",
                 "language_model.model.embed_tokens.weight", "language_model.lm_head.weight", layer + "base.weight",
                 layer + "experts.lora_b", layer + "general.lora_a", layer + "router.fc1.weight"):
        assert name in names, name


def test_pytorch_model_trains(tiny):
    """A causal-LM loss plus the balance loss backpropagates to the LoRA experts, routers, CoTR and projector."""
    model, batch, out, _ = tiny
    torch_model = LeoMiniForCausalLM.from_pretrained(out).train()
    inputs = torch_inputs(model, batch)
    labels = inputs["input_ids"].masked_fill(~inputs["attention_mask"] | inputs["prompt_mask"].bool(), -100)
    result = torch_model(**inputs, labels=labels)
    loss = result.loss + 0.05 * torch_model.balance_loss(inputs["attention_mask"])
    loss.backward()
    grads = {n: p.grad for n, p in torch_model.named_parameters()}
    layer = "language_model.model.layers.0.mlp.down_proj."
    for name in (layer + "experts.lora_a", layer + "experts.lora_b", layer + "general.lora_b",
                 layer + "router.fc1.weight", layer + "router.visual_proj.weight", layer + "router.prompt_proj.weight",
                 "cotr.experts.0.query", "cotr.experts.1.token_proj.weight", "cotr.text_proj.weight",
                 "projector.0.weight", "vision_experts.clip.embeddings.patch_embedding.weight"):
        assert grads[name] is not None and torch.isfinite(grads[name]).all(), name
        assert grads[name].abs().max() > 0, name


def check_component(model, paths, name, hf_class):
    """The component directory loads in transformers (or the package's EVA-02) with no missing or unexpected
    tensor, and imports back to exactly the whole model's parameters of that expert. Returns the torch module."""
    directory = paths[f"vision_experts/{name}"]
    if hf_class is None:  # EVA-02: timm layout, leo_jax.pytorch.eva02
        reference = eva_from_config(json.loads((directory / "config.json").read_text()))
        tensors = load_file(directory / "model.safetensors")
        reference.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    else:
        reference, info = hf_class.from_pretrained(directory, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
    ours = flat_params(model)
    for path, value in flat_params(api.load_hf(directory)).items():
        np.testing.assert_array_equal(value, ours[f"experts/{name}/{path}"], err_msg=path)
    return reference.eval()


def test_components_load_alone_in_transformers(tiny):
    from transformers import CLIPVisionModel, ConvNextModel, LlamaForCausalLM

    model, _, _, work = tiny
    paths = export_components(model, work / "components")
    assert sorted(paths) == ["llm", "vision_experts/clip", "vision_experts/convnext"]
    pixels = np.random.RandomState(1).normal(size=(1, 64, 64, 3)).astype(np.float32)
    for name, hf_class in (("clip", CLIPVisionModel), ("convnext", ConvNextModel)):
        reference = check_component(model, paths, name, hf_class)
        with torch.no_grad():
            want = reference(torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state.numpy()
        got = np.asarray(model.experts[name](jnp.asarray(pixels)))
        diff = np.abs(got - (want.transpose(0, 2, 3, 1) if want.ndim == 4 else want)).max()
        print(f"component {name}: transformers vs JAX max abs diff = {diff:.2e}")
        assert diff <= TOL
    llm, info = LlamaForCausalLM.from_pretrained(paths["llm"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert "MMoE LoRA experts" in json.loads((paths["llm"] / "config.json").read_text())["leo_mini_note"]
    base = api.load_hf(paths["llm"])
    assert base.cfg.mmoe is None
    ours = flat_params(model)
    for path, value in flat_params(base).items():
        np.testing.assert_array_equal(value, ours[f"llm/{path}"], err_msg=path)
    ids = np.random.RandomState(2).randint(0, 576, (1, 12))
    with torch.no_grad():
        want = llm.eval()(torch.from_numpy(ids)).logits.numpy()
    diff = np.abs(np.asarray(base(jnp.asarray(ids))) - want).max()
    print(f"component llm: transformers vs JAX max abs logits diff = {diff:.2e}")
    assert diff <= TOL


def test_bad_inputs_fail_clearly(tiny):
    model, batch, out, work = tiny
    broken = work / "broken"
    shutil.copytree(out, broken)
    tensors = load_file(broken / "model.safetensors")
    gone = "language_model.model.layers.1.mlp.down_proj.router.fc2.bias"
    del tensors[gone]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=gone.replace(".", r"\.")):
        api.load_hf(broken)
    with pytest.raises(ValueError, match=r"missing tensors \['" + gone.replace(".", r"\.")):
        LeoMiniForCausalLM.from_pretrained(broken)

    config = json.loads((out / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama', expected 'leo_mini'"):
        LeoMiniForCausalLM.from_pretrained(broken)
    (broken / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "leo_jax"}))
    with pytest.raises(ConversionError, match="no 'leo_jax' object"):
        api.load_hf(broken)

    torch_model = LeoMiniForCausalLM.from_pretrained(out)
    inputs = torch_inputs(model, batch)
    inputs["image_mask"] = torch.zeros_like(inputs["image_mask"])  # images dropped, placeholders kept
    with pytest.raises(ValueError, match="batch row 0 has 16 <IMG_CONTEXT> tokens .* but 0 visual tokens"):
        torch_model(**inputs)
    with pytest.raises(ValueError, match="no inputs for vision expert 'convnext'"):
        torch_model(**{**torch_inputs(model, batch), "images": {"clip": inputs["images"]["clip"]}})

    with pytest.raises(ConversionError, match="family='internlm2'"):
        get_family("leo_mini").rules(config_with(model.cfg, llm=dataclasses.replace(model.cfg.llm, family="internlm2")))


def test_five_more_expert_kinds_match_pytorch(tmp_path):
    """EVA-02, SigLIP (+ post-LN on a chosen layer), Pix2Struct (masked patches), SAM (neck map resized to its
    grid) and InternViT (InternVL vision) experts in one model, on a hand-built batch (two images, the second
    sample's slot empty); MMoE on three projections (one router per layer shared by them, o_proj's [heads, head_dim]
    input), top-2 renormalised. Each expert's component directory loads alone (transformers; EVA-02 in the
    package's timm-layout module)."""
    from transformers import InternVLVisionModel, Pix2StructVisionModel, SamVisionModel, SiglipVisionModel

    config = load_config("tiny_leo_mini")
    image = 32
    experts = [
        expert("eva", "eva02", dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, patch_size=8,
                                    image_size=(image, image), rope_ref_grid=(2, 2)), {"kind": "eva02", "size": image}),
        expert("siglip", "siglip_vision", dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                                               patch_size=8, image_size=image, output_layer=-2),
               {"kind": "siglip", "size": image}),
        expert("p2s", "pix2struct_vision", dict(hidden_size=32, patch_embed_hidden_size=48, d_ff=64, d_kv=16,
                                                num_layers=2, num_heads=2, seq_len=16, max_patches=12),
               {"kind": "pix2struct", "max_patches": 12, "patch_size": 4}),
        expert("sam", "sam_vision", dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=48, patch_size=8,
                                         image_size=image, output_channels=24, window_size=2, global_attn_indexes=(1,)),
               {"kind": "sam", "longest_edge": image}, grid=3),
        expert("internvit", "intern_vit", dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                                               patch_size=8, image_size=image),
               {"kind": "intern_vit", "size": image}),
    ]
    base = model_config(config.model)
    mmoe = dataclasses.replace(base.llm.mmoe, targets=("q_proj", "o_proj", "down_proj"), top_k=2, renormalize=True)
    model = random_model(config_with(base, experts=experts, llm=dataclasses.replace(base.llm, mmoe=mmoe)), seed=3)
    out = api.export_module(model, "leo_mini", tmp_path / "hf")
    batch = hand_built_batch(model, num_images=2, seq_len=48)
    torch_model = LeoMiniForCausalLM.from_pretrained(out)
    assert "language_model.model.layers.0.self_attn.o_proj.router.fc1.weight" not in torch_model.state_dict()
    diff, _ = compare_logits(model, batch, torch_model)
    print(f"LEO-MINI (EVA-02 + SigLIP + Pix2Struct + SAM + InternViT) PyTorch vs JAX: max abs logits diff = {diff:.2e}")
    assert diff <= TOL
    paths = export_components(model, tmp_path / "components")
    for name, hf_class in (("eva", None), ("siglip", SiglipVisionModel), ("p2s", Pix2StructVisionModel),
                           ("sam", SamVisionModel), ("internvit", InternVLVisionModel)):
        check_component(model, paths, name, hf_class)


def expert(name, kind, encoder, processor, grid=None):
    return {"name": name, "kind": kind, "encoder": {**encoder, "dtype": "float32"}, "processor": processor,
            "grid": grid}


def hand_built_batch(model, num_images, seq_len, seed=0):
    """Two samples: the first with `num_images` images, the second with one; random prompt ids around the
    <IMG_CONTEXT> runs, answers after them, right padding."""
    rng = np.random.RandomState(seed)
    nv, ctx = model.cotr.cfg.num_queries, model.cfg.image_context_id
    ids = np.zeros((2, seq_len), np.int32)
    prompt = np.zeros((2, seq_len), bool)
    segments = np.zeros((2, seq_len), np.int32)
    image_mask = np.array([[True] * num_images, [True] + [False] * (num_images - 1)])
    for row, images, length in ((0, num_images, seq_len), (1, 1, seq_len - 5)):
        tokens = list(rng.randint(3, 500, 3)) + [ctx] * (nv * images) + list(rng.randint(3, 500, 4))
        prompt_len = len(tokens)
        tokens += list(rng.randint(3, 500, length - prompt_len))
        ids[row, :length], prompt[row, :prompt_len], segments[row, :length] = tokens, True, 1
    batch = dict(input_ids=ids, prompt_mask=prompt, segment_ids=segments, image_mask=image_mask,
                 positions=np.where(segments > 0, np.arange(seq_len)[None], 0).astype(np.int32))
    for spec in model.specs:
        pre = get_preprocessor(**spec.processor)
        pictures = [rng.randint(0, 256, (40, 56, 3), np.uint8) for _ in range(2 * num_images)]
        if spec.kind in PATCH_INPUT_KINDS:
            host = [pre.host(p) for p in pictures]
            batch[spec.batch_key] = np.stack([h["flattened_patches"] for h in host]).reshape(2, num_images, -1,
                                                                                             pre.patch_dim)
            batch[f"patch_mask_{spec.name}"] = np.stack([h["attention_mask"] for h in host]).reshape(2, num_images, -1)
        else:
            batch[spec.batch_key] = np.stack([pre.host(p) for p in pictures]).reshape(2, num_images,
                                                                                     *pre.output_size, 3)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def test_main_command_cotr_options_survive_export(tiny, tmp_path):
    """The CoTR of the tiny_leo_mini_train preset (no pooled visual rows, spatial prior) is written to config.json
    and the PyTorch model reproduces the logits; the options do change them, so the check is not vacuous."""
    base, batch, _, _ = tiny
    preset_cotr = load_config("tiny_leo_mini_train").model.cotr
    cotr = dict(dataclasses.asdict(base.cfg.cotr), visual_bias=preset_cotr.visual_bias,
                spatial_prior=preset_cotr.spatial_prior)
    assert cotr["spatial_prior"] > 0 and not cotr["visual_bias"]
    model = random_model(config_with(base.cfg, cotr=cotr))
    out = api.export_module(model, "leo_mini", tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())["cotr"]
    assert (written["spatial_prior"], written["visual_bias"]) == (cotr["spatial_prior"], False)
    diff, _ = compare_logits(model, batch, LeoMiniForCausalLM.from_pretrained(out))
    paper_diff, _ = compare_logits(random_model(config_with(base.cfg)), batch, LeoMiniForCausalLM.from_pretrained(out))
    print(f"LEO-MINI with the main command's CoTR, PyTorch vs JAX: max abs logits diff = {diff:.2e} "
          f"(vs the paper's CoTR: {paper_diff:.2e})")
    assert diff <= TOL < paper_diff


@pytest.mark.parametrize("cotr, grid, tokens", [
    ({"text_bias": False}, 4, 16),  # CoTR without the prompt row
    ({"mode": "avg_pool"}, 4, 16),  # fixed 4 x 4 average pooling of CLIP's 8 x 8 and ConvNeXt's 4 x 4 grids
    ({"mode": "keep_all"}, 8, 64),  # no reduction: both experts on 8 x 8 grids, all 64 tokens per image
])
def test_ablation_reductions_survive_export(tiny, tmp_path, cotr, grid, tokens):
    """The ablation's CoTR options go through config.json, and the PyTorch model reproduces the JAX logits on a
    pipeline batch with the option's number of <IMG_CONTEXT> tokens per image."""
    _, _, _, work = tiny
    config = load_config("tiny_leo_mini")
    config.model.cotr.update(cotr)
    config.model.experts.convnext.grid = grid
    config.data.update(train_files=str(work / "data" / "data.json"), global_batch_size=2, shuffle=False, seq_len=192)
    model_cfg = model_config(config.model)
    assert model_cfg.visual_tokens_per_image() == tokens
    iterator = pipeline.make_train_iterator(config.data, visual.for_config(config), process_index=0, process_count=1)
    batch = {k: jnp.asarray(v) for k, v in next(iter(iterator)).items() if k != "sample_index"}
    assert int(np.sum(np.asarray(batch["input_ids"]) == model_cfg.image_context_id)) == 2 * tokens
    model = random_model(model_cfg)
    out = api.export_module(model, "leo_mini", tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())["cotr"]
    assert {k: written[k] for k in cotr} == cotr
    diff, _ = compare_logits(model, batch, LeoMiniForCausalLM.from_pretrained(out))
    print(f"LEO-MINI with CoTR {cotr}, PyTorch vs JAX: max abs logits diff = {diff:.2e}")
    assert diff <= TOL


TURN_1 = [{"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": "red"}]
TURN_2 = [{"from": "human", "value": "How many circles are there?"}, {"from": "gpt", "value": "two"}]


@pytest.fixture(scope="module")
def multi_turn_batch(tiny):
    """A validation batch of the tiny LEO-MINI pipeline: row 0 one exchange, row 1 the same and a second exchange
    (2 user turns, 2 answers) about the same image."""
    _, _, _, work = tiny
    image = json.loads((work / "data" / "data.json").read_text())[0]["image"]
    with open(work / "turns.jsonl", "w") as f:
        for conversations in (TURN_1, TURN_1 + TURN_2):
            f.write(json.dumps({"image": image, "conversations": conversations}) + "\n")
    config = load_config("tiny_leo_mini")
    config.data.update(eval_files=str(work / "turns.jsonl"), eval_image_root=str(work / "data"), eval_batch_size=2)
    iterator = pipeline.make_eval_iterator(config.data, visual.for_config(config), process_index=0, process_count=1)
    batch = {k: jnp.asarray(v) for k, v in next(iterator).items() if k != "sample_index"}
    iterator.close()
    return batch


@pytest.mark.parametrize("conditioning", ["turns_so_far", "first_turn", "all_turns"])
def test_multi_turn_conditioning_matches_jax(tiny, multi_turn_batch, tmp_path, conditioning):
    """On a two-exchange row the PyTorch model, reading `conditioning` from config.json, gives the JAX logits
    (per-token routing and per-image CoTR text); in PyTorch too answer 1's logits do not change when a second turn
    follows, except with 'all_turns' (the leak: the check can fail)."""
    base, _, _, _ = tiny
    batch = multi_turn_batch
    model = random_model(config_with(base.cfg, conditioning=conditioning), std=0.15)  # the text matters visibly
    out = api.export_module(model, "leo_mini", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["conditioning"] == conditioning
    torch_model = LeoMiniForCausalLM.from_pretrained(out)
    diff, _, logits = compare_logits(model, batch, torch_model, return_logits=True)
    # answer 1's predicting positions (loss_mask marks them) are the same columns in both rows
    answer_1 = np.flatnonzero(np.asarray(batch["loss_mask"][0]) > 0)
    assert len(answer_1) >= 2 and (np.asarray(batch["loss_mask"][1])[answer_1] > 0).all()
    turn_diff = float(np.abs(logits[0, answer_1] - logits[1, answer_1]).max())
    print(f"LEO-MINI multi-turn, conditioning {conditioning}: PyTorch vs JAX max abs logits diff = {diff:.2e}; "
          f"PyTorch answer-1 logits, one turn vs two turns: max abs diff = {turn_diff:.2e}")
    assert diff <= TOL
    if conditioning == "all_turns":
        assert turn_diff > 10 * TOL
    else:
        assert turn_diff <= 1e-6
