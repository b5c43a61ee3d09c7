"""User-facing conversion: Hugging Face directory <-> leo_jax checkpoint, and `load_hf` straight to a module."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from leo_jax.checkpoints import META_FILE, load_leo_params, load_trained, read_leo_meta, save_leo_checkpoint
from leo_jax.config import dataclass_from_config
from leo_jax.convert.core import (
    ConversionError,
    Family,
    HFCheckpoint,
    SafetensorsWriter,
    detect_family,
    export_tensors,
    get_family,
    import_params,
)
from leo_jax.data.export_files import PROCESSING_FILES
from leo_jax.layers.common import DTYPES, dtype_name
from leo_jax.sharding import build_mesh, tree_shardings


def _open(src: str | os.PathLike, family: str | None) -> tuple[HFCheckpoint, Family, Any]:
    ckpt = HFCheckpoint(src)
    fam = get_family(family) if family else detect_family(ckpt.config, ckpt.path / "config.json")
    return ckpt, fam, fam.config_from_hf(ckpt.config)


def abstract_model(family: Family, cfg: Any) -> nnx.Module:
    """The model with ShapeDtypeStructs instead of arrays: nothing is allocated."""
    return nnx.eval_shape(lambda: family.build(cfg, rngs=nnx.Rngs(0)))


def param_shardings(family: Family, cfg: Any, mesh: jax.sharding.Mesh | None) -> nnx.State:
    """Where each parameter of the model goes on `mesh` (by its logical axes; default: the first device)."""
    mesh = build_mesh(devices=jax.devices()[:1]) if mesh is None else mesh
    return tree_shardings(nnx.state(abstract_model(family, cfg), nnx.Param), mesh)


def copy_processing_files(src: Path, out: Path) -> None:
    """Copies the tokenizer and preprocessing files a model directory may hold (leo_jax exports do) next to the
    weights in `out`, so the converted model stays usable for inference alone."""
    for name in PROCESSING_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(out) / name)


def module_from_params(family: Family, cfg: Any, params: dict[str, jax.Array]) -> nnx.Module:
    """Builds the module around already-converted arrays {param path: array} (no random init)."""
    graphdef, state = nnx.split(abstract_model(family, cfg))
    flat = [(path, var.replace(params["/".join(map(str, path))])) for path, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _name(dtype: Any, where: str) -> str | None:
    return None if dtype is None else dtype_name(dtype, where)


def load_hf(path: str | os.PathLike, dtype: Any = "float32", param_dtype: Any = "float32",
            family: str | None = None, mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
    """A leo_jax module holding the weights of a Hugging Face directory (family from config.json's model_type).

    `dtype` is the compute dtype, `param_dtype` the storage dtype of the parameters (names or jnp / numpy dtypes;
    None keeps the config's, e.g. a leo_jax export's). With `mesh`, each parameter is read straight onto it, placed
    by its logical axes."""
    ckpt, fam, cfg = _open(path, family)
    cfg = fam.with_dtype(cfg, _name(dtype, "dtype") if dtype is not None else getattr(cfg, "dtype", None),
                         _name(param_dtype, "param_dtype") if param_dtype is not None
                         else getattr(cfg, "param_dtype", None))
    params = import_params(fam, cfg, ckpt, nnx.state(abstract_model(fam, cfg), nnx.Param),
                           param_shardings(fam, cfg, mesh))
    return module_from_params(fam, cfg, params)


def import_hf(src: str | os.PathLike, out: str | os.PathLike, family: str | None = None,
              param_dtype: Any = "float32") -> Path:
    """HF directory -> leo_jax checkpoint directory (Orbax params + leo_model.json)."""
    ckpt, fam, cfg = _open(src, family)
    param_dtype = dtype_name(param_dtype, "param_dtype")
    cfg = fam.with_dtype(cfg, getattr(cfg, "dtype", None), param_dtype)  # whole models: None keeps each part's
    params = import_params(fam, cfg, ckpt, nnx.state(abstract_model(fam, cfg), nnx.Param))
    out = save_leo_checkpoint(out, fam.name, cfg, params, ckpt.config, ckpt.dtype())
    copy_processing_files(ckpt.path, out)
    return out


def load_leo(ckpt_dir: str | os.PathLike, dtype: Any = None, param_dtype: Any = None,
             mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
    """A module from a leo_jax checkpoint written by `import_hf`; `dtype` / `param_dtype` replace the compute /
    storage dtype when given. With `mesh`, each parameter is restored straight onto it, placed by its logical
    axes."""
    meta = read_leo_meta(ckpt_dir)
    fam = get_family(meta["family"])
    cfg = dataclass_from_config(fam.config_cls, meta["model"], f"{ckpt_dir}/{META_FILE}:model")
    if dtype is not None or param_dtype is not None:
        cfg = fam.with_dtype(cfg, dtype_name(dtype) if dtype is not None else getattr(cfg, "dtype", None),
                             dtype_name(param_dtype) if param_dtype is not None else getattr(cfg, "param_dtype", None))
    abstract = {"/".join(map(str, p)): v.get_value() for p, v in
                nnx.to_flat_state(nnx.state(abstract_model(fam, cfg), nnx.Param))}
    placement = {"/".join(map(str, p)): s for p, s in nnx.to_flat_state(param_shardings(fam, cfg, mesh))}
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placement[k]) for k, v in abstract.items()}
    return module_from_params(fam, cfg, load_leo_params(ckpt_dir, abstract))


def export_module(module: nnx.Module, family: str, out: str | os.PathLike, dtype: Any = None,
                  hf_config: dict | None = None, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Writes a module as a Hugging Face directory (config.json + safetensors), one layer at a time."""
    fam = get_family(family)
    params = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    return _write_hf(fam, module.cfg, params, out, dtype, hf_config or {}, max_shard_bytes)


def export_trained(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: Any = None,
                   components: bool = False, max_shard_bytes: int = 5 * 1024**3, tokenizer: str | None = None,
                   allow_nonofficial: bool = False) -> Path:
    """The model of a training checkpoint as one directory (its kind's family: 'leo' in the official LEO layout,
    'leo_mini', or the LLM's own family) and, with `components`, each part as a Hugging Face directory under
    out/components/ (the whole-model family module's `export_components`).

    Models with image inputs (LEO / LEO-MINI) also get the tokenizer (`tokenizer`, default the run's data.tokenizer),
    its tokenizer_config.json with the training template as `chat_template`, and preprocessor_config.json, so the
    directory alone is enough; the model's image-context id must be that tokenizer's <IMG_CONTEXT>. A family with
    a reference implementation (LEO: the official code) refuses a config that code cannot build, naming the
    fields, unless `allow_nonofficial`."""
    from leo_jax.data import export_files, templates, visual

    model, config = load_trained(str(ckpt))
    family = model.cfg.export_family
    fam = get_family(family)
    if components and fam.export_components is None:
        raise ConversionError(f"--components applies to whole models (LEO / LEO-MINI); a {family} model is one "
                              f"component")
    hf_fields = {}
    data = config.data.copy_and_resolve_references()
    if visual.for_model(model.cfg, data).preprocessors():  # image inputs: ship tokenizer and preprocessing
        data.tokenizer = tokenizer or data.tokenizer
        if not data.tokenizer:
            raise ConversionError(f"{ckpt}: the run's config has no data.tokenizer; pass --tokenizer PATH (the "
                                  f"tokenizer the model was trained with), which the export ships")
        hf_fields = fam.data_fields(data)
        problems = fam.upstream_problems(fam.config_to_hf(model.cfg, hf_fields))
        if problems and not allow_nonofficial:
            raise ConversionError(f"the official {family} code cannot build this model: " + "; ".join(problems)
                                  + " (--allow-nonofficial exports it anyway, for leo_jax.pytorch only)")
        shipped = export_files.write_processing_files(model.cfg, data, out)
        context_id = shipped.token_to_id(templates.IMG_CONTEXT)
        if context_id != model.cfg.image_context_id:
            raise ConversionError(f"config.model.image_context_id={model.cfg.image_context_id} but the tokenizer "
                                  f"{data.tokenizer} has {templates.IMG_CONTEXT} at id {context_id}: pass the "
                                  f"tokenizer the model was trained with (--tokenizer)")
    path = export_module(model, family, out, dtype=dtype, hf_config=hf_fields, max_shard_bytes=max_shard_bytes)
    if components:
        fam.export_components(model, Path(out) / "components", dtype)
    return path


def export_hf(src: str | os.PathLike, out: str | os.PathLike, dtype: Any = None,
              max_shard_bytes: int = 5 * 1024**3) -> Path:
    """leo_jax checkpoint -> HF directory; tensors in `dtype` (default: the dtype of the imported checkpoint)."""
    meta = read_leo_meta(src)
    fam = get_family(meta["family"])
    cfg = dataclass_from_config(fam.config_cls, meta["model"], f"{src}/{META_FILE}:model")
    params = load_leo_params(src)
    dtype = _name(dtype, "dtype") or meta.get("hf_dtype")
    out = _write_hf(fam, cfg, params, out, dtype, meta.get("hf_config", {}), max_shard_bytes)
    copy_processing_files(Path(src), out)
    return out


def _write_hf(fam: Family, cfg: Any, params: dict, out, dtype: Any, hf_config: dict,
              max_shard_bytes: int) -> Path:
    out = Path(out)
    dtype = _name(dtype, "--dtype")
    writer = SafetensorsWriter(out, max_shard_bytes)
    for name, array in export_tensors(fam, cfg, params, DTYPES.get(dtype)):
        writer.add(name, array)
    writer.close()
    hf = fam.config_to_hf(cfg, hf_config)
    if dtype is not None:
        hf["dtype"] = dtype
    fam.write_config(hf, out)
    return out
