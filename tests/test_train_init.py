"""config.train.init: components from a Hugging Face directory, whole models from an earlier training stage."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from hf_fixtures import save_hf_model
from leo_jax.configs import tiny_leo_mini
from leo_jax.convert import load_hf
from leo_jax.models.registry import build_model
from leo_jax.sharding import build_mesh
from leo_jax.train.config import TrainConfig
from leo_jax.train.loop import Trainer
from leo_jax.train.optimizer import TrainableFilter, make_optimizer
from leo_jax.train.pretrained import apply_init
from leo_jax.train.state import create_train_state
from train_helpers import llm_train_config


def flat(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


def test_llm_component_from_hugging_face(tmp_path):
    """LEO-MINI's 'llm' from a Llama HF directory: every LLM weight is the HF one (as load_hf converts it), the MMoE
    adapters keep their initialisation, other components are untouched; frozen/trainable groups are respected."""
    config = tiny_leo_mini.get_config()
    llm = config.model.llm
    save_hf_model("llama", dict(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
                                intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
                                num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
                                rope_theta=llm.rope_theta, max_position_embeddings=512, tie_word_embeddings=False),
                   tmp_path / "hf")
    train = TrainConfig(steps=1, learning_rate=1e-3, trainable=("llm/layers/mmoe/.*", "projector/.*"))
    tx, _ = make_optimizer(train, 1)
    mesh = build_mesh({"ici": {"data": 2, "fsdp": 2, "tensor": 2}})
    _, state, _ = create_train_state(lambda rngs: build_model(config.model, rngs),
                                     TrainableFilter(train.trainable, train.frozen), tx, 0, mesh)
    before = {**flat(state.trainable), **flat(state.frozen)}
    state = apply_init(state, {"llm": str(tmp_path / "hf")})
    after = {**flat(state.trainable), **flat(state.frozen)}
    reference = flat(nnx.state(load_hf(tmp_path / "hf"), nnx.Param))
    assert len(reference) > 5
    for name, value in after.items():
        rel = name[len("llm/"):]
        if name.startswith("llm/") and "/mmoe/" not in name:
            np.testing.assert_array_equal(value, reference[rel], err_msg=name)
        else:
            np.testing.assert_array_equal(value, before[name], err_msg=name)
    kernel = state.frozen["llm"]["layers"]["mlp"]["up_proj"]["kernel"].get_value()
    assert len(kernel.sharding.device_set) == 8  # placed on the state's shardings


def test_init_errors_name_the_problem(tmp_path):
    config = tiny_leo_mini.get_config()
    train = TrainConfig(steps=1, learning_rate=1e-3)
    tx, _ = make_optimizer(train, 1)
    _, state, _ = create_train_state(lambda rngs: build_model(config.model, rngs), TrainableFilter((".*",), ()), tx,
                                     0, build_mesh(devices=jax.devices()[:1]))
    with pytest.raises(ValueError, match="no parameters under 'vision'"):
        apply_init(state, {"vision": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="is not a leo_jax checkpoint"):
        apply_init(state, {"llm": str(tmp_path)})
    save_hf_model("llama", dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2), tmp_path / "small")
    with pytest.raises(ValueError, match=r"embed/embedding has shape \(64, 32\) in the checkpoint but \(576, 128\)"):
        apply_init(state, {"llm": str(tmp_path / "small")})


def test_next_stage_starts_from_the_previous_stage(tmp_path):
    """A new run initialised with {'': WORKDIR/checkpoints/STEP} starts from that run's parameters (fresh optimizer,
    step 0), whatever its own seed and freezing."""
    first = str(tmp_path / "stage1")
    stage1 = Trainer(llm_train_config(first, steps=2, checkpoint_every=2, trainable=("lm_head/.*",)), first)
    stage1.run()
    second = str(tmp_path / "stage2")
    config = llm_train_config(second, steps=2, init={"": os.path.join(first, "checkpoints", "2")})
    config.seed = 7
    stage2 = Trainer(config, second)
    stage2.setup()
    assert int(stage2.state.step) == 0
    expected = {**flat(stage1.state.trainable), **flat(stage1.state.frozen)}
    got = {**flat(stage2.state.trainable), **flat(stage2.state.frozen)}
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
