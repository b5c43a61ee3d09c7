"""The one JSON reader: its errors name the file and what to do, for every directory format that reads through it."""

import re
import shutil

import pytest

from leo_jax.checkpoints import read_leo_meta
from leo_jax.convert.core import ConversionError, HFCheckpoint
from leo_jax.data.export_files import read_data_config
from leo_jax.data.tokenizer import SYNTHETIC_TOKENIZER_PATH, load_tokenizer
from leo_jax.jsonfile import read_json, write_json


def test_read_json_values_and_errors(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"a": [1, 2.5, null]}')
    bad.write_text('{\n  "a": 1,\n  "b": \n}')
    assert read_json(good, "needed", "fix it") == {"a": [1, 2.5, None]}
    with pytest.raises(FileNotFoundError, match=r"missing\.json not found: the model needs it$"):
        read_json(tmp_path / "missing.json", "the model needs it", "fix it")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON \(Expecting value at line 4 column 1\); "
                                         r"re-export it$"):
        read_json(bad, "needed", "re-export it")
    for path in (tmp_path / "missing.json", bad):  # a caller's own error class, for both failures
        with pytest.raises(ConversionError, match=str(path)):
            read_json(path, "needed", "fix it", ConversionError)


def test_write_json_reads_back(tmp_path):
    value = {"b": [1, {"z": None}], "a": "é <image>"}
    write_json(tmp_path / "sorted.json", value)
    write_json(tmp_path / "ordered.json", value, sort_keys=False)
    assert (tmp_path / "sorted.json").read_text() == ('{\n  "a": "é <image>",\n  "b": [\n    1,\n    {\n'
                                                       '      "z": null\n    }\n  ]\n}\n')
    assert (tmp_path / "ordered.json").read_text().startswith('{\n  "b": [')
    assert read_json(tmp_path / "sorted.json", "", "") == read_json(tmp_path / "ordered.json", "", "") == value


@pytest.mark.parametrize("reader, name, missing, fix", [
    (read_leo_meta, "leo_model.json", r"is not a leo_jax model checkpoint \(write one with `python -m leo_jax.convert "
                                      r"import-hf", "fix it or convert again"),
    (read_data_config, "tokenizer_config.json", r"a model directory needs it for the conversation template "
                                                r"\(exports written by", "re-export the model"),
], ids=["converted-checkpoint", "exported-directory"])
def test_directory_formats_name_the_file_and_the_remedy(tmp_path, reader, name, missing, fix):
    (tmp_path / "tokenizer.json").write_text("{}")  # an exported directory's tokenizer is checked first
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(name)} not found: .*{missing}"):
        reader(tmp_path)
    (tmp_path / name).write_text('{"leo_jax_template": "plain"} x')
    with pytest.raises(ValueError, match=rf"{re.escape(name)} is not valid JSON .*; {fix}$"):
        reader(tmp_path)


def test_hugging_face_directory_raises_conversion_errors(tmp_path):
    with pytest.raises(ConversionError, match=r"config\.json not found: a Hugging Face directory needs config\.json"):
        HFCheckpoint(tmp_path)


def test_pytorch_processor_reads_through_the_same_reader(tmp_path):
    from leo_jax.pytorch.processing import LeoProcessor

    with pytest.raises(FileNotFoundError, match=r"config\.json not found: the model config \(export the model with"):
        LeoProcessor(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{,}")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON \(.* line 1 column 2\); "
                                         r"re-export the model"):
        LeoProcessor(tmp_path)


def test_tokenizer_config_is_read_through_the_same_reader(tmp_path):
    shutil.copy(SYNTHETIC_TOKENIZER_PATH, tmp_path / "tokenizer.json")
    assert load_tokenizer(str(tmp_path)).eos_id is not None  # no tokenizer_config.json: optional
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>",}')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON .*; fix or replace it"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("model", ["LeoModel", "LeoMiniForCausalLM"])
def test_pytorch_models_read_config_through_the_same_reader(tmp_path, model):
    import leo_jax.pytorch

    cls = getattr(leo_jax.pytorch, model)
    with pytest.raises(FileNotFoundError, match=r"config\.json not found: export a LEO(-MINI)? model there first"):
        cls.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "leo_mini",}')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON \(.* line 1 column 27\); "
                                         r"re-export the model$"):
        cls.from_pretrained(tmp_path)


def test_pytorch_leo_mini_reads_its_shard_index_through_the_same_reader(tmp_path):
    from leo_jax.pytorch import LeoMiniForCausalLM

    (tmp_path / "config.json").write_text('{"model_type": "leo_mini"}')
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model-1.safetensors"}')
    with pytest.raises(ValueError, match=r"index\.json is not valid JSON .*; re-export the model$"):
        LeoMiniForCausalLM.from_pretrained(tmp_path)
    index.write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r"index\.json lacks a 'weight_map' object .*: re-export the model$"):
        LeoMiniForCausalLM.from_pretrained(tmp_path)
    index.write_text('{"weight_map": {"a": "model-1.safetensors"}}')
    with pytest.raises(FileNotFoundError, match=r"model-1\.safetensors not found \(LEO-MINI weights\)"):
        LeoMiniForCausalLM.from_pretrained(tmp_path)
