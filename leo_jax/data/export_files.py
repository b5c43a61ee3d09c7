"""The files an exported model directory holds next to its weights so that it is usable alone: the tokenizer
(tokenizer.json, or a SentencePiece tokenizer.model, with the image tokens), tokenizer_config.json with the special
tokens and `chat_template` (the training conversation template as Jinja), and preprocessor_config.json (per encoder
or expert: size, resize rule, mean/std; LEO's tiling). All of it comes from the training config's `data` section,
through the same objects the data pipeline uses."""

from __future__ import annotations

from pathlib import Path

from leo_jax.data import pipeline, templates, visual
from leo_jax.data.tokenizer import Tokenizer
from leo_jax.jsonfile import read_json, write_json


def write_tokenizer_files(tokenizer: Tokenizer, template_name: str, seq_len: int, out: Path) -> None:
    """tokenizer.json / tokenizer.model + tokenizer_config.json (special tokens, chat_template, model_max_length)."""
    template = templates.get_template(template_name)
    config = tokenizer.export(str(out), add_bos=template.add_bos)
    name = lambda token_id: None if token_id is None else tokenizer.id_to_token(token_id)  # noqa: E731
    config.update(bos_token=name(tokenizer.bos_id), eos_token=name(tokenizer.eos_id), pad_token=name(tokenizer.pad_id),
                  chat_template=templates.chat_template_jinja(template), model_max_length=int(seq_len),
                  clean_up_tokenization_spaces=False, leo_jax_template=template.name)
    write_json(out / "tokenizer_config.json", config, sort_keys=False)


def preprocessor_config(model_cfg, data_config) -> dict:
    """{'model_kind' (the model's export family), 'encoders': {model input name: preprocessor settings}, LEO: 'tiling'
    (its data-side kind)}."""
    config: dict = {"model_kind": model_cfg.export_family, "encoders": {name: pre.settings() for name, pre in
                                                                        visual.input_preprocessors(model_cfg).items()}}
    kind = visual.for_model(model_cfg, data_config)
    if isinstance(kind, visual.LeoTiles):
        config["tiling"] = {"tile_size": kind.tile_size, "min_tiles": kind.min_tiles, "max_tiles": kind.max_tiles,
                            "use_thumbnail": kind.use_thumbnail, "tokens_per_tile": kind.tokens_per_tile,
                            "several_images": "each image gets max_tiles // number of images tiles",
                            "inputs": "every tile (thumbnail last) goes to both encoders.pixel_values and "
                                      "encoders.pixel_values_sam"}
    return config


def write_processing_files(model_cfg, data_config, out: str | Path) -> Tokenizer:
    """Writes the tokenizer files and preprocessor_config.json into `out`; returns the tokenizer (image tokens
    registered, as in training)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = pipeline.prepare_tokenizer(data_config)
    write_tokenizer_files(tokenizer, data_config.template, data_config.seq_len, out)
    write_json(out / "preprocessor_config.json", preprocessor_config(model_cfg, data_config), sort_keys=False)
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
PROCESSING_FILES = TOKENIZER_FILES + ("tokenizer_config.json", "preprocessor_config.json")


# Why a missing file matters, for `read_json`.
_NEEDED_FOR = "a model directory needs it for {} (exports written by `python -m leo_jax.convert export` ship it)"


def read_data_config(model_dir: str | Path):
    """The `data` options inference needs, rebuilt from the files `write_processing_files` wrote into `model_dir`:
    the tokenizer (the directory itself), the conversation template and row length (tokenizer_config.json) and
    LEO's tiling (preprocessor_config.json); the rest are the defaults. Encoder preprocessing comes with the model."""
    from leo_jax.configs import common_data

    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"missing tokenizer: {model_dir} holds neither {model_dir / TOKENIZER_FILES[0]} nor "
                                f"{TOKENIZER_FILES[1]}; copy the tokenizer the model was trained with into it")
    tokenizer_config = read_json(model_dir / "tokenizer_config.json", _NEEDED_FOR.format("the conversation template"),
                                 "re-export the model")
    if not tokenizer_config.get("leo_jax_template"):
        raise ValueError(f"{model_dir / 'tokenizer_config.json'} lacks 'leo_jax_template' (the training conversation "
                         "template): re-export the model with leo_jax")
    pre = read_json(model_dir / "preprocessor_config.json", _NEEDED_FOR.format("the image preprocessing"),
                    "re-export the model")
    data = common_data.get_config()
    data.tokenizer = str(model_dir)
    data.template = tokenizer_config["leo_jax_template"]
    data.seq_len = int(tokenizer_config.get("model_max_length", data.seq_len))
    tiling = pre.get("tiling")
    if tiling is not None:
        data.leo.update(min_tiles=int(tiling["min_tiles"]), max_tiles=int(tiling["max_tiles"]),
                        use_thumbnail=bool(tiling["use_thumbnail"]))
    return data
