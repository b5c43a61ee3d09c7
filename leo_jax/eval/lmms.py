"""lmms-eval adapter: its `lmms` model interface (`generate_until`, `loglikelihood`) over an `InferenceEngine`,
registered under the model name `leo_jax`.

    pip install '.[eval]'
    python -m lmms_eval --model leo_jax --model_args pretrained=DIR[,dtype=bfloat16,mesh=fsdp:8] \
        --tasks TASKS --batch_size 8 --output_path OUT

DIR is anything `python -m leo_jax.eval --ckpt` takes: a training workdir or step directory, an import-hf
checkpoint or an exported model directory (`leo_jax.infer.loading.load_any`). lmms-eval finds the model through
the `lmms_eval.models` entry point that the package declares (`manifest` below); the class itself
(`leo_jax.eval.lmms_model.LeoJax`) only adds lmms-eval's base class, so everything here works, and is tested,
without lmms-eval installed.

Requests map to the engine as follows: the task's context (`doc_to_text`) is the user turn, its visuals
(`doc_to_visual`, PIL images) the turn's images (one `<image>` line each, first, unless the context places them);
the conversation template and image processing are the model's own. `generate_until` decodes greedily unless the
task asks for a temperature, stops at the template's terminator or at the first of the task's `until` strings, and
honours `max_new_tokens`. `loglikelihood` returns, as lmms-eval's own models do, a loss: -log P(continuation |
prompt) (summed over the continuation's tokens), and whether greedy decoding yields the continuation; lmms-eval's
multiple-choice scoring picks the choice of lowest loss (argmin).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from leo_jax.eval.benchmark import generate_batched
from leo_jax.infer.chat import InferenceEngine, Request

MODEL_NAME = "leo_jax"
CLASS_PATH = "leo_jax.eval.lmms_model.LeoJax"
DEFAULT_MAX_NEW_TOKENS = 128  # when a task's generation_kwargs do not set max_new_tokens


def manifest():
    """The `lmms_eval.models` entry point: lmms-eval's registration record for the model name `leo_jax`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def flatten_visuals(visuals: Any) -> list:
    """A task's `doc_to_visual` result (None, one image or nested lists of images) as a flat list."""
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in flatten_visuals(item)]
    return [visuals]


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class LmmsRequests:
    """The lmms-eval request handling of the `leo_jax` model (lmms-eval's `lmms` base class is mixed in by
    `leo_jax.eval.lmms_model`). lmms-eval fills `task_dict` (task -> split -> documents) before it sends requests."""

    def __init__(self, engine: InferenceEngine, batch_size: int = 1):
        if int(batch_size) < 1:
            raise ValueError(f"model_args batch_size must be >= 1, got {batch_size}")
        self.engine = engine
        self.batch_size = int(batch_size)
        self.task_dict: dict = {}

    def _document(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError) as e:
            raise ValueError(f"lmms-eval request for task {task!r} split {split!r} document {doc_id}: no such "
                             f"document in the model's task_dict (tasks: {sorted(self.task_dict)})") from e

    def _request(self, context: str, doc_to_visual, task: str, split: str, doc_id: int) -> Request:
        visuals = flatten_visuals(doc_to_visual(self._document(task, split, doc_id))) if doc_to_visual else []
        return Request.single(context, visuals, origin=f"{task}/{split}/{doc_id}")

    def generate_until(self, requests) -> list[str]:
        """Answer text per request (`Instance.args`: context, generation_kwargs, doc_to_visual, doc_id, task, split);
        requests with the same generation settings are batched."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        prepared = []
        for index, instance in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            sampling = self.engine.sampling(
                max_new_tokens=int(gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
                temperature=float(gen_kwargs.get("temperature", 0.0) or 0.0),
                top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0) if gen_kwargs.get("temperature") else 1.0)
            prepared.append(self._request(context, doc_to_visual, task, split, doc_id))
            groups.setdefault((sampling, until), []).append(index)
        for (sampling, until), indices in groups.items():
            texts = generate_batched(self.engine, [prepared[i] for i in indices], sampling, self.batch_size)
            for index, text in zip(indices, texts):
                answers[index] = cut_at_stops(text, until).strip()
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(-log P(continuation | prompt), is greedy) per request (`Instance.args`: context, continuation or
        doc_to_target, doc_to_visual, doc_id, task, split), `batch_size` at a time."""
        prepared, continuations = [], []
        for instance in requests:
            context, target, doc_to_visual, doc_id, task, split = instance.args
            continuation = target if isinstance(target, str) else target(self._document(task, split, doc_id))
            prepared.append(self._request(context, doc_to_visual, task, split, doc_id))
            continuations.append(str(continuation))
        out: list[tuple[float, bool]] = []
        for start in range(0, len(prepared), self.batch_size):
            chunk = prepared[start:start + self.batch_size]
            texts = continuations[start:start + self.batch_size]
            fill = self.batch_size - len(chunk)  # same batch shape for every call (see generate_batched)
            scored = self.engine.loglikelihood(chunk + [chunk[-1]] * fill, texts + [texts[-1]] * fill)[:len(chunk)]
            out += [(-logprob, greedy) for logprob, greedy in scored]
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the leo_jax lmms-eval model answers generate_until and loglikelihood tasks; "
                                  "multi-round tasks are not supported")
