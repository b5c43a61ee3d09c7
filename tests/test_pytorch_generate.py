"""PyTorch generation from an exported directory: tiny LEO and LEO-MINI trained checkpoints exported with
`export_trained`; `LeoProcessor` builds the JAX engine's prompt tokens from the exported files alone, and the PyTorch
model's greedy `generate()` (KV cache, batch of 3 left-padded prompts of different lengths) gives the JAX engine's
tokens; stop tokens end a row, seeded sampling repeats, bad input fails clearly, and the PyTorch side imports no JAX."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from leo_jax.checkpoints import load_trained
from leo_jax.config import load_config
from leo_jax.convert.api import export_trained
from leo_jax.data import synthetic
from leo_jax.infer.chat import InferenceEngine, Request
from leo_jax.jsonfile import read_json, write_json
from leo_jax.pytorch import LeoMiniForCausalLM, LeoModel
from leo_jax.pytorch.processing import MODEL_KINDS, LeoProcessor
from train_helpers import save_step0_checkpoint

NEW_TOKENS = 6
QUESTIONS = ["What color is the square?", "What shape is the red object?",
             "Is the red circle left or right of the blue square in this picture?"]
TORCH_MODELS = {"leo": LeoModel, "leo_mini": LeoMiniForCausalLM}


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.write_dataset(out, 8, seed=0, val_num=4, multi_turn_fraction=0.0, multi_image_fraction=0.0,
                            text_only_fraction=0.0)
    return out


@pytest.fixture(scope="module", params=["leo", "leo_mini"])
def exported(request, synthetic_dir, tmp_path_factory):
    """(kind, training workdir, export dir, image paths): a tiny model's step-0 train state (LLM weights of std 0.5,
    so greedy answers vary) saved as the trainer saves it, then exported."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    config = load_config(f"tiny_{kind}_train")
    config.data.update(train_files=os.path.join(synthetic_dir, "data.json"),
                       eval_files=os.path.join(synthetic_dir, "val.json"))
    config.model.llm = {**config.model.llm, "initializer_range": 0.5}
    workdir = str(root / "run")
    save_step0_checkpoint(config, workdir)
    export_trained(workdir, str(root / "export"))
    images = [os.path.join(synthetic_dir, "images", "val", f"{i:06d}.png") for i in range(3)]
    return kind, workdir, str(root / "export"), images


def test_pytorch_generate_equals_the_jax_engine(exported):
    kind, workdir, export_dir, images = exported
    engine = InferenceEngine(*load_trained(workdir))
    requests = [Request.single(q, [image]) for q, image in zip(QUESTIONS, images)]
    expected = engine.generate_tokens(requests, engine.sampling(max_new_tokens=NEW_TOKENS))

    processor = LeoProcessor.from_pretrained(export_dir)
    inputs = processor([[{"role": "user", "content": q}] for q in QUESTIONS], [[image] for image in images])
    batch, lengths = engine.prepare(requests)
    mask = inputs["attention_mask"].numpy()
    assert len(set(mask.sum(1).tolist())) == 3  # three prompt lengths: real left padding
    for row in range(3):  # the processor's prompt is the engine's, token for token
        np.testing.assert_array_equal(inputs["input_ids"][row].numpy()[mask[row] == 1],
                                      np.asarray(batch["input_ids"])[row, :lengths[row]])
    model = TORCH_MODELS[kind].from_pretrained(export_dir)
    got = model.generate(**inputs, **processor.generation_kwargs(max_new_tokens=NEW_TOKENS)).numpy()
    np.testing.assert_array_equal(got, expected)
    assert len({tuple(row) for row in got.tolist()}) > 1  # the rows differ: the comparison is not trivial
    assert processor.batch_decode(got) == engine.generate(requests, engine.sampling(max_new_tokens=NEW_TOKENS))


def test_multi_turn_generate_equals_the_jax_engine(exported):
    """A prompt with a history (question, answer, follow-up question) next to a one-turn prompt: the processor marks
    the history's answer where the engine's row does, and greedy PyTorch tokens equal the engine's (LEO-MINI: the
    first exchange's tokens are routed without the follow-up question, as in training)."""
    kind, workdir, export_dir, images = exported
    engine = InferenceEngine(*load_trained(workdir))
    history = [{"from": "human", "value": "<image>\n" + QUESTIONS[0]}, {"from": "gpt", "value": "red"},
               {"from": "human", "value": QUESTIONS[1]}]
    requests = [Request(tuple(history), (images[0],)), Request.single(QUESTIONS[2], [images[1]])]
    expected = engine.generate_tokens(requests, engine.sampling(max_new_tokens=NEW_TOKENS))
    processor = LeoProcessor.from_pretrained(export_dir)
    inputs = processor([history, QUESTIONS[2]], [[images[0]], [images[1]]])
    batch, lengths = engine.prepare(requests)
    mask = inputs["attention_mask"].numpy()
    for row in range(2):
        real = mask[row] == 1
        np.testing.assert_array_equal(inputs["input_ids"][row].numpy()[real],
                                      np.asarray(batch["input_ids"])[row, :lengths[row]])
        answers = np.pad(np.asarray(batch["loss_mask"])[row, :lengths[row] - 1] > 0, (1, 0))  # the target tokens
        np.testing.assert_array_equal(inputs["answer_mask"][row].numpy()[real], answers)
    assert inputs["answer_mask"][0].sum() >= 2 and inputs["answer_mask"][1].sum() == 0
    model = TORCH_MODELS[kind].from_pretrained(export_dir)
    got = model.generate(**inputs, **processor.generation_kwargs(max_new_tokens=NEW_TOKENS)).numpy()
    np.testing.assert_array_equal(got, expected)
    if kind == "leo_mini":  # the history's answer splits the row into two exchanges: the routing depends on it
        with torch.no_grad():
            _, _, (_, prompt) = model.embed_inputs(**{k: v for k, v in inputs.items() if k != "answer_mask"})
            _, _, (_, split) = model.embed_inputs(**inputs)
        first = int(np.flatnonzero(inputs["answer_mask"][0].numpy())[0])
        assert float((prompt[0, :first] - split[0, :first]).abs().max()) > 1e-4
        assert torch.equal(prompt[0, -1], split[0, -1])  # the last exchange sees every turn either way


def test_stop_tokens_and_seeded_sampling(exported):
    kind, _, export_dir, images = exported
    processor = LeoProcessor.from_pretrained(export_dir)
    model = TORCH_MODELS[kind].from_pretrained(export_dir)
    inputs = processor(QUESTIONS, [[image] for image in images])
    pad = processor.pad_id
    greedy = model.generate(**inputs, max_new_tokens=NEW_TOKENS, pad_token_id=pad)
    stop = int(greedy[0, 1])  # row 0's second token as a stop id: row 0 stops there, pads after it
    stopped = model.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=stop, pad_token_id=pad)
    first = int(np.flatnonzero(greedy[0].numpy() == stop)[0])
    assert stopped[0, :first + 1].tolist() == greedy[0, :first + 1].tolist()
    assert (stopped[0, first + 1:] == pad).all()
    sample = lambda seed: model.generate(**inputs, max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=0.9,  # noqa
                                         generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample(3), sample(3))


def test_bad_input_is_a_clear_error(exported, tmp_path):
    kind, _, export_dir, images = exported
    processor = LeoProcessor.from_pretrained(export_dir)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=f"conversation 0: image {bad} cannot be read"):
        processor(["What is it?"], [[str(bad)]])
    with pytest.raises(ValueError, match="conversation 0: image .*missing.png: file not found"):
        processor(["What is it?"], [[str(tmp_path / "missing.png")]])
    model = TORCH_MODELS[kind].from_pretrained(export_dir)
    inputs = processor(["What is it?"], [[images[0]]])
    with pytest.raises(ValueError, match="exceeds the context of .* positions .max_position_embeddings"):
        model.generate(**inputs, max_new_tokens=1 << 20)
    copy = tmp_path / "no_tokenizer"
    copy.mkdir()
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(export_dir, name), copy / name)
    with pytest.raises(FileNotFoundError, match="missing tokenizer: .*neither tokenizer.json nor tokenizer.model"):
        LeoProcessor.from_pretrained(copy)


def test_preprocessor_config_chooses_the_kind_and_its_errors_name_the_file(exported, tmp_path):
    kind, _, export_dir, _ = exported
    assert type(LeoProcessor.from_pretrained(export_dir).kind) is MODEL_KINDS[kind]
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    pre_file = copy / "preprocessor_config.json"
    pre = read_json(pre_file, "", "")
    broken = {**pre, "model_kind": "llm"}
    if kind == "leo":
        wrong = {**pre, "tiling": {k: v for k, v in pre["tiling"].items() if k != "tokens_per_tile"}}
        message = r"LEO needs a 'tiling' object with \[.*'tokens_per_tile'\]"
    else:
        first = next(name for name in pre["encoders"] if name.startswith(("pixels_", "patches_")))
        wrong = {**pre, "encoders": {k: v for k, v in pre["encoders"].items() if k != first}}
        message = f"no encoder entry for vision expert '{first.split('_', 1)[1]}'"
    for value, match in ((broken, "model_kind='llm'; LeoProcessor serves 'leo' and 'leo_mini' exports"),
                         (wrong, message)):
        write_json(pre_file, value)
        with pytest.raises(ValueError, match=f"{re.escape(str(pre_file))}: {match}"):
            LeoProcessor.from_pretrained(copy)


def test_pytorch_side_imports_no_jax():
    code = ("import sys, leo_jax.pytorch, leo_jax.pytorch.processing, leo_jax.pytorch.generation; "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_generate_keywords_give_the_jax_decoders_sampling_options():
    from leo_jax.infer.generate import SamplingConfig

    assert SamplingConfig.from_hf(5, 0.7, 0.9, 7, None) == SamplingConfig(5, 0.7, 0.9, eos_ids=(7,), pad_id=0)
    assert SamplingConfig.from_hf(5, 0.0, 1.0, [2, np.int64(3)], np.int64(4)) == SamplingConfig(5, eos_ids=(2, 3),
                                                                                               pad_id=4)
    assert SamplingConfig.from_hf(1, 0.0, 1.0, None, None) == SamplingConfig(1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        SamplingConfig.from_hf(5, 1.0, 0, None, None)
