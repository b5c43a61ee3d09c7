"""`python -m leo_jax.convert export`: a training checkpoint -> the whole-model directory (+ components), read back
bit-identical by `load_hf` and loadable (strictly) by the package's PyTorch models; clear errors otherwise."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from leo_jax.checkpoints import load_trained
from leo_jax.config import load_config
from leo_jax.convert import load_hf
from leo_jax.convert.__main__ import main as convert_main
from leo_jax.models.registry import build_model
from leo_jax.sharding import build_mesh
from leo_jax.train.checkpoint import Checkpointer
from leo_jax.train.state import create_train_state
from train_helpers import llm_train_config


def write_checkpoint(workdir, preset: str, config=None) -> None:
    """A step-0 training checkpoint of a freshly initialised preset (what the trainer writes, minus data state)."""
    config = config or load_config(preset)
    mesh = build_mesh(devices=jax.devices()[:1])
    _, state, _ = create_train_state(lambda rngs: build_model(config.model, rngs), nnx.Param, optax.adamw(1e-3), 0,
                                     mesh)
    checkpointer = Checkpointer(str(workdir / "checkpoints"), keep=1, async_save=False)
    checkpointer.save(0, state, None, config.to_dict())
    checkpointer.wait()
    checkpointer.close()


def flat_params(module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.mark.parametrize("preset, torch_model, components", [
    ("tiny_leo", "LeoModel", ("llm", "intern_vit", "sam")),
    ("tiny_leo_mini", "LeoMiniForCausalLM", ("llm", "vision_experts/clip", "vision_experts/convnext")),
])
def test_export_of_a_training_checkpoint_round_trips(tmp_path, capsys, preset, torch_model, components):
    import leo_jax.pytorch as leo_torch

    write_checkpoint(tmp_path / "run", preset)
    out = tmp_path / "export"
    assert convert_main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(out), "--components"]) == 0
    assert "wrote" in capsys.readouterr().out
    trained, _ = load_trained(str(tmp_path / "run"))
    expected, got = flat_params(trained), flat_params(load_hf(out))
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
    getattr(leo_torch, torch_model).from_pretrained(out)  # strict: every tensor has its place, none is missing
    for part in components:
        assert (out / "components" / part / "config.json").is_file(), part


def test_export_errors_name_the_problem(tmp_path, capsys):
    assert convert_main(["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"no checkpoints found in {tmp_path}" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["tiny_leo", "tiny_leo_mini"])
def test_export_ships_tokenizer_chat_template_and_preprocessing(tmp_path, preset):
    """The directory alone: transformers' AutoTokenizer loads the shipped tokenizer and gives our ids (BOS included)
    for a multi-turn, two-image conversation rendered with the shipped Jinja chat_template; config.json's image
    context id is that tokenizer's <IMG_CONTEXT>; preprocessor_config.json has each encoder's input size, resize rule
    and mean/std as the model's preprocessors (LEO: the official config and its tiling)."""
    import json

    from transformers import AutoTokenizer

    from leo_jax.convert.leo import upstream_problems
    from leo_jax.data import templates, visual
    from leo_jax.models.registry import model_config

    config = load_config(preset)
    write_checkpoint(tmp_path / "run", preset, config)
    out = tmp_path / "export"
    assert convert_main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(out)]) == 0
    hf_tok = AutoTokenizer.from_pretrained(out)
    ours = templates.setup_tokenizer(config.data.tokenizer, config.data.template)
    conversation = [{"from": "human", "value": "<image>\n<image>\nWhat color is the circle?"},
                    {"from": "gpt", "value": "red"}, {"from": "human", "value": "How many squares?"},
                    {"from": "gpt", "value": "two"}]
    enc = templates.encode_conversation(conversation, ours, config.data.template, [1, 1])
    roles = {"human": "user", "gpt": "assistant"}
    text = hf_tok.apply_chat_template([{"role": roles[t["from"]], "content": t["value"]} for t in conversation],
                                      tokenize=False)
    text = text.replace("<image>", "<img><IMG_CONTEXT></img>")
    assert hf_tok(text, add_special_tokens=False).input_ids == enc.input_ids.tolist()
    plain = "What color is the circle? <|im_end|> two"
    assert hf_tok(plain, add_special_tokens=False).input_ids == ours.encode(plain)
    bos = [ours.bos_id] if templates.get_template(config.data.template).add_bos else []
    assert hf_tok(plain).input_ids == bos + ours.encode(plain)  # BOS as the official tokenizer adds it
    hf = json.loads((out / "config.json").read_text())
    context_id = hf["img_context_token_id"] if preset == "tiny_leo" else hf["image_context_id"]
    assert context_id == hf_tok.convert_tokens_to_ids("<IMG_CONTEXT>") == ours.token_to_id("<IMG_CONTEXT>") >= 0
    pre = json.loads((out / "preprocessor_config.json").read_text())
    expected = {name: p.settings() for name, p in visual.input_preprocessors(model_config(config.model)).items()}
    assert pre["encoders"] == json.loads(json.dumps(expected)) and len(expected) >= 2
    if preset == "tiny_leo":
        assert upstream_problems(hf) == []
        assert pre["encoders"]["pixel_values_sam"]["size"]["longest_edge"] == hf["vision_config_2"]["image_size"]
        assert pre["encoders"]["pixel_values"]["size"]["height"] == hf["vision_config_1"]["image_size"]
        assert pre["tiling"]["max_tiles"] == hf["max_dynamic_patch"] == config.data.leo.max_tiles


def test_export_refuses_a_leo_the_official_code_cannot_build(tmp_path, capsys):
    """tiny LEO with a 32-channel SAM neck (mlp2 input 128, the official code builds 256): refused with the fields
    named; --allow-nonofficial exports it for leo_jax.pytorch."""
    import leo_jax.pytorch as leo_torch

    config = load_config("tiny_leo")
    config.model.sam.output_channels = 32
    write_checkpoint(tmp_path / "run", "tiny_leo", config)
    assert convert_main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "vision_config_2.output_channels=32" in err and "--allow-nonofficial" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert convert_main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                         "--allow-nonofficial"]) == 0
    leo_torch.LeoModel.from_pretrained(tmp_path / "out")


def test_export_of_an_llm_checkpoint_uses_its_own_family(tmp_path, capsys):
    """An LLM run exports in its LLM family's layout (no tokenizer / preprocessing files: no image inputs) and reads
    back bit-identical; --components names why it does not apply."""
    config = llm_train_config(str(tmp_path / "run"))
    write_checkpoint(tmp_path / "run", "tiny_llm", config)
    out = tmp_path / "export"
    assert convert_main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == config.model.family
    assert not (out / "preprocessor_config.json").exists() and not (out / "tokenizer_config.json").exists()
    trained, _ = load_trained(str(tmp_path / "run"))
    expected, got = flat_params(trained), flat_params(load_hf(out))
    assert expected.keys() == got.keys() and all(np.array_equal(got[k], v) for k, v in expected.items())
    assert convert_main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "c"), "--components"]) == 2
    assert f"a {config.model.family} model is one component" in capsys.readouterr().err
