"""Typed nested configs: `config.model` builds nested frozen dataclasses once (LLM, MMoE, encoders, experts keyed
by name), errors name the full path of a bad nested field, and configs built twice from the same dict are equal and
hash equal (JAX hashes them as static arguments)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from leo_jax.config import FrozenDict, config_from_argv, load_config
from leo_jax.convert.core import get_family
from leo_jax.models.cotr import CoTROptions
from leo_jax.models.leo_mini import VisionExpertConfig
from leo_jax.models.llm.decoder import LLMConfig
from leo_jax.models.mmoe import MMoEConfig
from leo_jax.models.projector import ProjectorOptions
from leo_jax.models.registry import model_classes, model_config
from leo_jax.models.vision.intern_vit import InternViTConfig
from leo_jax.models.vision.sam import SamVisionConfig


def test_nested_sections_build_typed_dataclasses():
    leo = model_config(load_config("tiny_leo").model)
    assert isinstance(leo.intern_vit, InternViTConfig) and isinstance(leo.sam, SamVisionConfig)
    assert isinstance(leo.llm, LLMConfig) and isinstance(leo.projector, ProjectorOptions) and leo.projector.layer_norm
    mini = model_config(load_config("tiny_leo_mini").model)
    assert isinstance(mini.llm.mmoe, MMoEConfig) and mini.llm.mmoe.rank == 4
    assert isinstance(mini.cotr, CoTROptions) and isinstance(mini.projector, ProjectorOptions)
    assert [e.name for e in mini.experts] == ["clip", "convnext"]
    for expert in mini.experts:
        assert isinstance(expert, VisionExpertConfig) and isinstance(expert.encoder, model_classes(expert.kind)[0])
        assert isinstance(expert.processor, FrozenDict)
    assert not mini.projector.layer_norm  # LEO-MINI's projector default (no LayerNorm) when the section omits it
    no_norm = load_config("tiny_leo_mini").model.to_dict()
    del no_norm["projector"]["layer_norm"]
    assert not model_config(no_norm).projector.layer_norm


def test_command_line_overrides_reach_nested_fields():
    config, _ = config_from_argv(["--config", "tiny_leo_mini", "--config.model.experts.clip.encoder.num_layers=1",
                                  "--config.model.llm.mmoe.rank=2", "--config.model.cotr.num_queries=4"])
    cfg = model_config(config.model)
    clip = {e.name: e for e in cfg.experts}["clip"]
    assert (clip.encoder.num_layers, cfg.llm.mmoe.rank, cfg.cotr_config.num_queries) == (1, 2, 4)
    assert cfg.visual_tokens_per_image() == 4


@pytest.mark.parametrize("preset, path, value, message", [
    ("tiny_leo", ("llm", "num_layers"), "two", r"config.model.llm.num_layers: expected an integer, got 'two'"),
    ("tiny_leo", ("sam", "window"), 3, r"config.model.sam: unknown field\(s\) \['window'\]"),
    ("tiny_leo", ("projector", "act"), 1, r"config.model.projector.act: expected a string, got 1"),
    ("tiny_leo_mini", ("llm", "mmoe", "rank"), 1.5, r"config.model.llm.mmoe.rank: expected an integer, got 1.5"),
    ("tiny_leo_mini", ("experts", "clip", "encoder", "hidden_size"), "wide",
     r"config.model.experts.clip.encoder.hidden_size: expected an integer, got 'wide'"),
    ("tiny_leo_mini", ("experts", "convnext", "encoder", "depth"), 1,
     r"config.model.experts.convnext.encoder: unknown field\(s\) \['depth'\]"),
    ("tiny_leo_mini", ("cotr", "num_queries"), None, r"config.model.cotr.num_queries: expected an integer, got None"),
    ("tiny_leo_mini", ("experts", "clip", "processor"), "clip",
     r"config.model.experts.clip.processor: expected a mapping"),
])
def test_a_bad_nested_field_names_its_full_path(preset, path, value, message):
    model = load_config(preset).model.to_dict()
    node = model
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValueError, match=message):
        model_config(model)


@pytest.mark.parametrize("preset", ["tiny_llm", "llama3_1_8b", "tiny_leo", "tiny_leo_mini"])
def test_configs_built_twice_are_equal_and_hash_equal(preset):
    model = load_config(preset).model.to_dict()
    a, b = model_config(model), model_config(json.loads(json.dumps(model)))  # lists instead of tuples, new dicts
    assert a is not b and a == b and hash(a) == hash(b)
    changed = dataclasses.replace(a, llm=dataclasses.replace(a.llm, num_layers=3)) if hasattr(a, "llm") else \
        dataclasses.replace(a, num_layers=3)
    assert changed != a
    traces = []
    f = jax.jit(lambda x, cfg: traces.append(cfg) or x + 1, static_argnums=1)
    f(jnp.zeros(()), a)
    f(jnp.zeros(()), b)
    assert len(traces) == 1  # the equal config hits the compilation cache
    f(jnp.zeros(()), changed)
    assert len(traces) == 2


def test_free_form_sections_are_frozen():
    cfg = model_config(load_config("llama3_1_8b").model)
    assert cfg.rope_scaling["rope_type"] == "llama3" and isinstance(cfg.rope_scaling, FrozenDict)
    with pytest.raises(TypeError, match="immutable"):
        cfg.rope_scaling["factor"] = 2.0
    direct = LLMConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                       rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert isinstance(direct.rope_scaling, FrozenDict) and hash(direct) == hash(dataclasses.replace(direct))


@pytest.mark.parametrize("preset", ["tiny_llm", "internlm2_7b", "tiny_leo", "tiny_leo_mini"])
def test_export_config_round_trips_every_kind(preset):
    """config.json written for the model's own export family (no kind names) reads back as an equal config; LEO-MINI
    also reads a config.json whose `leo_jax` sections list only some fields (written before they were typed)."""
    cfg = model_config(load_config(preset).model)
    fam = get_family(cfg.export_family)
    hf = json.loads(json.dumps(fam.config_to_hf(cfg, {})))
    back = fam.config_from_hf(hf)
    assert fam.config_to_hf(back, {}) == fam.config_to_hf(cfg, {})
    if preset in ("tiny_leo", "tiny_leo_mini"):
        assert back == cfg and hash(back) == hash(cfg)
    else:
        assert back.export_family == cfg.export_family == cfg.family
        assert {f: getattr(back, f) for f in ("vocab_size", "num_layers", "rope_scaling", "eos_token_id")} == \
            {f: getattr(cfg, f) for f in ("vocab_size", "num_layers", "rope_scaling", "eos_token_id")}
    if preset == "tiny_leo_mini":
        hf["leo_jax"]["cotr"] = {"num_queries": 16, "proj_width": 32, "dtype": "float32"}
        hf["leo_jax"]["projector"] = {"act": "gelu", "dtype": "float32"}
        assert fam.config_from_hf(hf) == cfg
