"""Public API conventions: dtypes as names or in the Flax convention, presets by name or by a user's own file."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_fixtures import LLAMA2, save_hf_model
from leo_jax.config import load_config
from leo_jax.convert import load_hf


def _params(module) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", LLAMA2, out)
    return out


@pytest.mark.parametrize("name, flax_dtype", [("float32", jnp.float32), ("bfloat16", jnp.bfloat16),
                                              ("float16", np.float16)])
def test_load_hf_takes_dtype_names_and_dtypes_alike(llama_dir, name, flax_dtype):
    """load_hf(dtype=jnp.float32) and dtype='float32' build identical modules: same config, parameters, logits."""
    by_name = load_hf(llama_dir, dtype=name, param_dtype=name)
    by_dtype = load_hf(llama_dir, dtype=flax_dtype, param_dtype=np.dtype(flax_dtype))
    assert by_dtype.cfg == by_name.cfg and by_name.cfg.dtype == name and by_name.cfg.param_dtype == name
    a, b = _params(by_name), _params(by_dtype)
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].dtype == b[path].dtype == np.dtype(flax_dtype), path
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, LLAMA2["vocab_size"], (2, 7)), jnp.int32)
    logits = by_name(ids)
    np.testing.assert_array_equal(np.asarray(logits, np.float32), np.asarray(by_dtype(ids), np.float32))


def test_load_hf_rejects_a_non_float_dtype_by_name(llama_dir):
    with pytest.raises(ValueError, match=r"dtype=.*int32.*use one of \['bfloat16', 'float16', 'float32'\]"):
        load_hf(llama_dir, dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"param_dtype='fp32': use one of"):
        load_hf(llama_dir, param_dtype="fp32")


def test_presets_load_by_name_and_user_files_compose_them(tmp_path):
    """A preset by name; a user's file (outside the repository) importing the shipped presets as
    leo_jax.configs.<name>; a path to a moved preset names the preset to use instead."""
    base = load_config("tiny_llm", arg="qwen2_7b")
    mine = tmp_path / "my_preset.py"
    mine.write_text("from leo_jax.configs import tiny_llm\n\n\n"
                    "def get_config():\n"
                    "    config = tiny_llm.get_config('qwen2_7b')\n"
                    "    config.model.num_layers = 3\n"
                    "    return config\n")
    config = load_config(str(mine), ["model.hidden_size=32"])
    assert config.model.num_layers == 3 and config.model.hidden_size == 32
    assert config.model.family == base.model.family == "qwen2" and base.model.num_layers == 2
    with pytest.raises(FileNotFoundError, match=r"configs/tiny_llm.py not found; the preset is now named 'tiny_llm'"):
        load_config("configs/tiny_llm.py")
    assert load_config("tiny_llm", arg="qwen2_7b").model.num_layers == 2  # imported presets are not mutated
