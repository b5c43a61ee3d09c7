"""Configs, mesh and sharding rules, parameter counts, golden partition specs and the command lines."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from leo_jax.config import load_config
from leo_jax.models.registry import abstract_model, model_config
from leo_jax.presets import model_presets, partition_specs
from leo_jax.sharding import build_mesh, constrain, fit_spec_to_shape, logical_to_spec
from leo_jax.summary import parameter_counts

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "partition_specs.json"


@pytest.mark.parametrize("preset, expected", [("llama3_8b", 8_030_261_248), ("internlm2_7b", 7_737_708_544),
                                              ("llama2_7b", 6_738_415_616), ("qwen2_7b", 7_615_616_512)])
def test_full_size_parameter_counts(preset, expected):
    counts = parameter_counts(abstract_model(load_config(preset).model), depth=1)
    assert sum(counts.values()) == expected


def test_presets_compose_and_override():
    vicuna = load_config("vicuna_7b")
    assert vicuna.model.pad_token_id == 0 and vicuna.model.hidden_size == load_config("llama2_7b").model.hidden_size
    tiny = load_config("tiny_llm", ["config.model.num_layers=3", "model.dtype=bfloat16"], arg="qwen2_7b")
    cfg = model_config(tiny.model)
    assert (cfg.num_layers, cfg.dtype, cfg.family, cfg.qkv_bias) == (3, "bfloat16", "qwen2", True)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"config has no field 'config.model.num_layer'"):
        load_config("tiny_llm", ["model.num_layer=3"])
    with pytest.raises(ValueError, match=r"config.model.num_heads=4 must be a multiple of config.model.num_kv_heads=3"):
        model_config(load_config("tiny_llm", ["model.num_kv_heads=3"]).model)
    with pytest.raises(ValueError, match=r"config.model.remat_policy='fast'"):
        model_config(load_config("tiny_llm", ["model.remat_policy=fast"]).model)
    with pytest.raises(ValueError, match=r"config.model.hidden_size expects a int, got 'wide'"):
        load_config("tiny_llm", ["model.hidden_size=wide"])
    with pytest.raises(ValueError, match=r"config.model.hidden_size: expected an integer, got 'wide'"):
        model_config({**load_config("tiny_llm").model.to_dict(), "hidden_size": "wide"})
    with pytest.raises(ValueError, match=r"config.model.kind='gpt' is unknown"):
        model_config(load_config("tiny_llm", ["model.kind=gpt"]).model)
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(ValueError, match=r"broken.py cannot be parsed"):
        load_config(str(broken))
    with pytest.raises(FileNotFoundError, match=r"presets: \[.*llama3_8b"):
        load_config("llama9_8b")


def test_mesh_from_config():
    mesh = build_mesh({"ici": {"data": 2, "fsdp": -1, "tensor": 2}})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(build_mesh({}).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(build_mesh({}, devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    multi = build_mesh({"ici": {"data": 1, "fsdp": -1}, "dcn": {"data": 2}})
    assert dict(multi.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="only one axis may be -1"):
        build_mesh({"ici": {"data": -1, "fsdp": -1}})
    with pytest.raises(ValueError, match="multiply to 6"):
        build_mesh({"ici": {"data": 3, "fsdp": 2}})
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        build_mesh({"ici": {"model": 2}})


def test_logical_rules():
    assert logical_to_spec(("batch", "length", "act_embed")) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor", None)
    with pytest.raises(KeyError, match="'embd' has no rule"):
        logical_to_spec(("embd",))
    mesh = build_mesh({"ici": {"data": 2, "fsdp": 2, "tensor": 2}})
    # 3 KV heads cannot be split over tensor=2: that dim falls back to replicated, the rest stays sharded
    assert fit_spec_to_shape(P("fsdp", "tensor", None), (64, 3, 16), mesh) == P("fsdp", None, None)
    assert fit_spec_to_shape(P(("data", "fsdp")), (2,), mesh) == P("data")
    x = jax.numpy.ones((8, 4))
    assert constrain(x, ("batch", None)) is x  # no mesh in context: a no-op


def test_golden_partition_specs():
    """Every preset's parameter partition specs equal the checked-in golden file (regenerate with
    `python -m tests.golden.make_partition_specs` and review the diff when sharding is changed on purpose)."""
    golden = json.loads(GOLDEN.read_text())
    presets = model_presets()
    assert sorted(golden) == sorted(presets), "golden file out of date: run python -m tests.golden.make_partition_specs"
    for name in presets:
        assert partition_specs(name) == golden[name], name


def _run(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_summary_cli():
    result = _run("leo_jax.summary", "--config", "internlm2_7b")
    assert result.returncode == 0, result.stderr
    assert "7,737,708,544  (7.74B)" in result.stdout
    assert "layers/mlp" in result.stdout
    bad = _run("leo_jax.summary", "--config", "tiny_llm", "--config.model.hidden_size=-3")
    assert bad.returncode != 0 and "config.model.hidden_size must be positive" in bad.stderr


def test_convert_cli_round_trip_and_errors(tmp_path):
    from hf_fixtures import LLAMA2, save_hf_model

    save_hf_model("llama", LLAMA2, tmp_path / "hf")
    ok = _run("leo_jax.convert", "import-hf", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "leo"))
    assert ok.returncode == 0, ok.stderr
    back = _run("leo_jax.convert", "export-hf", "--src", str(tmp_path / "leo"), "--out", str(tmp_path / "hf2"))
    assert back.returncode == 0, back.stderr
    assert (tmp_path / "hf2" / "model.safetensors").read_bytes() == (tmp_path / "hf" / "model.safetensors").read_bytes()
    again = _run("leo_jax.convert", "import-hf", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "leo"))
    assert again.returncode == 2 and "is not empty" in again.stderr
    missing = _run("leo_jax.convert", "import-hf", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "nope is not a directory" in missing.stderr
