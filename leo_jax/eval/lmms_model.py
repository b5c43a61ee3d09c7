"""The `leo_jax` model class that lmms-eval instantiates (`--model leo_jax --model_args pretrained=DIR,...`):
lmms-eval's `lmms` base class around `leo_jax.eval.lmms.LmmsRequests`. Importing this module needs lmms-eval
(`pip install '.[eval]'`)."""

from __future__ import annotations

from lmms_eval.api.model import lmms

from leo_jax.eval.lmms import LmmsRequests


class LeoJax(LmmsRequests, lmms):
    """model_args: pretrained (any directory `leo_jax.infer.loading.load_any` takes, required), dtype (cast the
    parameters, e.g. bfloat16), mesh (e.g. fsdp:8 or data:2/tensor:4; default one device). The requests per
    generation call come from lmms-eval's `--batch_size N` (lmms-eval passes it to the constructor, so it is not a
    model_arg). lmms-eval's own `device` and `max_batch_size` are accepted and not used: JAX places the model."""

    is_simple = True

    def __init__(self, pretrained: str, batch_size: int | str = 1, dtype: str | None = None, mesh: str | None = None,
                 device=None, max_batch_size=None):
        from leo_jax.infer.chat import InferenceEngine
        from leo_jax.infer.loading import load_any
        from leo_jax.sharding import mesh_from_flag

        if not str(batch_size).isdigit():
            raise ValueError(f"the leo_jax model takes an integer --batch_size, got {batch_size!r} (lmms-eval's "
                             "'auto' probes for CUDA memory, which a JAX model does not report)")
        lmms.__init__(self)
        model, config = load_any(pretrained, dtype=dtype, mesh=None if mesh is None else mesh_from_flag(mesh))
        LmmsRequests.__init__(self, InferenceEngine(model, config), batch_size=int(batch_size))
