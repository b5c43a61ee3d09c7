"""`leo_jax.infer.loading.load_any`: a training workdir, a step directory, an import-hf checkpoint and an exported
directory of the same weights give the same parameters and greedy answers (also through `generate` and `eval`);
parameters loaded onto an 8-device mesh give the answers of one device; unknown directories and a missing tokenizer
are errors naming the files."""

from __future__ import annotations

import io
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from leo_jax import generate as generate_cli
from leo_jax.config import load_config
from leo_jax.convert.api import export_trained, import_hf
from leo_jax.data import synthetic
from leo_jax.eval.__main__ import main as eval_main
from leo_jax.infer.chat import InferenceEngine, Request
from leo_jax.infer.loading import CONVERTED, EXPORTED, TRAINING, directory_kind, load_any
from leo_jax.sharding import mesh_from_flag
from train_helpers import save_step0_checkpoint

NEW_TOKENS = 6
QUESTIONS = ["What color is the square?", "What shape is the red object?", "Is the red circle left or right?"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{kind: directory} of one tiny LEO-MINI (LLM weights of std 0.5, so greedy answers vary by prompt and image):
    its training workdir (step 0), step directory, export and the import-hf checkpoint of that export; and the
    synthetic set."""
    root = tmp_path_factory.mktemp("loader")
    data_dir, workdir = str(root / "synthetic"), str(root / "run")
    synthetic.write_dataset(data_dir, 8, seed=0, val_num=4, multi_turn_fraction=0.0, multi_image_fraction=0.0,
                            text_only_fraction=0.0)
    config = load_config("tiny_leo_mini_train")
    config.data.update(train_files=os.path.join(data_dir, "data.json"), eval_files=os.path.join(data_dir, "val.json"))
    config.model.llm = {**config.model.llm, "initializer_range": 0.5}
    save_step0_checkpoint(config, workdir)
    export_trained(workdir, root / "export")
    import_hf(root / "export", root / "converted")
    return {"workdir": workdir, "step": os.path.join(workdir, "checkpoints", "0"), "export": str(root / "export"),
            "converted": str(root / "converted"), "data": data_dir}


def requests(data_dir) -> list[Request]:
    return [Request.single(q, [os.path.join(data_dir, "images", "val", f"{i:06d}.png")])
            for i, q in enumerate(QUESTIONS)]


def answers(model, config, data_dir) -> list[str]:
    engine = InferenceEngine(model, config)
    return engine.generate(requests(data_dir), engine.sampling(max_new_tokens=NEW_TOKENS))


def flat(model) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_every_directory_kind_loads_the_same_weights_and_answers(dirs):
    kinds = {name: directory_kind(dirs[name]) for name in ("workdir", "step", "export", "converted")}
    assert kinds == {"workdir": TRAINING, "step": TRAINING, "export": EXPORTED, "converted": CONVERTED}
    reference_model, reference_config = load_any(dirs["workdir"])
    reference = answers(reference_model, reference_config, dirs["data"])
    assert len(set(reference)) > 1, reference  # the comparisons below are not between constant outputs
    expected = flat(reference_model)
    for name in ("step", "export", "converted"):
        model, config = load_any(dirs[name])
        assert type(model.cfg) is type(reference_model.cfg), name
        params = flat(model)
        assert sorted(params) == sorted(expected), name
        for key, value in expected.items():
            np.testing.assert_array_equal(params[key], value, err_msg=f"{name}: {key}")
        assert config.data.template == reference_config.data.template == "llama3"
        assert config.model.kind == "leo_mini"
        assert answers(model, config, dirs["data"]) == reference, name

    half, _ = load_any(dirs["export"], dtype="bfloat16")
    assert {v.dtype for v in flat(half).values() if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16"
            } == {np.dtype(jax.numpy.bfloat16)}


@pytest.mark.parametrize("flag", ["fsdp=8", "data=2,tensor=4"])
def test_sharded_inference_equals_one_device(dirs, flag):
    assert len(jax.devices()) == 8
    single = answers(*load_any(dirs["export"]), dirs["data"])
    model, config = load_any(dirs["export"], mesh=mesh_from_flag(flag))
    placed = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert all(len(a.sharding.device_set) == 8 for a in placed)
    assert any(not a.sharding.is_fully_replicated for a in placed)  # spread over the devices, not copied
    assert answers(model, config, dirs["data"]) == single
    # a training workdir onto the same mesh
    assert answers(*load_any(dirs["workdir"], mesh=mesh_from_flag(flag)), dirs["data"]) == single


def test_generate_and_eval_through_an_export_equal_the_workdir(dirs, tmp_path, capsys):
    image = os.path.join(dirs["data"], "images", "val", "000000.png")
    outputs = {}
    for name in ("workdir", "export"):
        out = io.StringIO()
        argv = ["--ckpt", dirs[name], "--image", image, "--prompt", QUESTIONS[0], "--prompt", QUESTIONS[1],
                "--max-new-tokens", str(NEW_TOKENS)]
        assert generate_cli.main(argv, out=out) == 0
        outputs[name] = out.getvalue()
    out = io.StringIO()
    assert generate_cli.main(["--ckpt", dirs["export"], "--mesh", "fsdp=8", "--image", image, "--prompt",
                              QUESTIONS[0], "--prompt", QUESTIONS[1], "--max-new-tokens", str(NEW_TOKENS)],
                             out=out) == 0
    assert outputs["workdir"] == outputs["export"] == out.getvalue() and outputs["workdir"].startswith("[0] ")

    data = os.path.join(dirs["data"], "val.jsonl")
    results = {}
    for name, extra in (("workdir", []), ("export", []), ("export", ["--mesh", "data=2,tensor=4"])):
        out = tmp_path / f"{name}{len(extra)}"
        assert eval_main(["--ckpt", dirs[name], "--data", data, "--out", str(out), "--batch-size", "2",
                          "--max-new-tokens", "4", *extra]) == 0
        predictions = [json.loads(line) for line in open(out / "predictions.jsonl")]
        summary = json.load(open(out / "summary.json"))
        results[(name, len(extra))] = ([p["prediction"] for p in predictions], [p["score"] for p in predictions],
                                       summary["score"], summary["per_metric"])
    assert len(results[("workdir", 0)][0]) == 4
    assert results[("workdir", 0)] == results[("export", 0)] == results[("export", 2)]
    # an exported directory's default output directory is DIR/eval/<data stem>
    assert eval_main(["--ckpt", dirs["export"], "--data", data, "--limit", "1", "--max-new-tokens", "2"]) == 0
    assert os.path.isfile(os.path.join(dirs["export"], "eval", "val", "summary.json"))
    capsys.readouterr()


def test_unknown_directories_and_a_missing_tokenizer_are_clear_errors(dirs, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no model directory leo_jax knows: looked for a training checkpoint"
                                                r".*leo_model\.json.*config\.json.*found \['notes\.txt'\]"):
        load_any(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_any(tmp_path / "missing")

    broken = tmp_path / "export"
    shutil.copytree(dirs["export"], broken)
    os.remove(broken / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=f"missing tokenizer: {broken} holds neither {broken}/tokenizer.json"):
        load_any(broken)
    assert generate_cli.main(["--ckpt", str(broken), "--prompt", "hi"], out=io.StringIO()) == 2
    assert f"missing tokenizer: {broken}" in capsys.readouterr().err
    os.remove(broken / "tokenizer_config.json")
    shutil.copyfile(os.path.join(dirs["export"], "tokenizer.json"), broken / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=f"{broken}/tokenizer_config.json not found"):
        load_any(broken)

    with pytest.raises(ValueError, match="--mesh 'fsdp=3' needs 3 devices, there are 8"):
        mesh_from_flag("fsdp=3")
    with pytest.raises(ValueError, match="--mesh 'model=8': expected comma-separated axis=size"):
        mesh_from_flag("model=8")
    assert dict(mesh_from_flag("data:2/tensor:4").shape) == {"data": 2, "fsdp": 1, "tensor": 4}
