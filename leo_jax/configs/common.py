"""Settings shared by every preset: seed and mesh. Model presets add `config.model`."""

import dataclasses

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Mesh axes (data, fsdp, tensor): sizes within a slice (ici) and across slices (dcn); one ici size may be -1.
    config.mesh = ml_collections.ConfigDict({"ici": {"data": -1, "fsdp": 1, "tensor": 1},
                                             "dcn": {"data": 1, "fsdp": 1, "tensor": 1}})
    return config


def model_section(kind: str, config_cls, **fields) -> ml_collections.ConfigDict:
    """`config.model` for a model kind with EVERY field of its config dataclass present (defaults filled in), so
    any field can be overridden with --config.model.<field>=..."""
    section = {"kind": kind}
    for field in dataclasses.fields(config_cls):
        if field.default is not dataclasses.MISSING:
            section[field.name] = field.default
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no field(s) {unknown}")
    section.update(fields)
    return ml_collections.ConfigDict(section)


def encoder_fields(preset_model: ml_collections.ConfigDict) -> tuple[str, dict]:
    """(kind, fields) of an encoder preset's `config.model`."""
    fields = preset_model.to_dict()
    return fields.pop("kind"), fields


def vision_expert(preset_model: ml_collections.ConfigDict, processor: dict, grid=None) -> dict:
    """One LEO-MINI expert entry from an encoder preset's `config.model` and its image preprocessor options."""
    kind, fields = encoder_fields(preset_model)
    return {"kind": kind, "encoder": fields, "processor": dict(processor), "grid": grid}


def vision_experts(**experts: dict) -> dict:
    """`experts` (keyed by name) and `expert_order` (the order given here) of a LEO-MINI `config.model`."""
    return {"experts": experts, "expert_order": tuple(experts)}
