"""Inference engine for trained LEO / LEO-MINI / LLM checkpoints: (images, prompt, history) -> answers.

Model inputs are built by the training data pipeline itself (`pipeline.SampleTransform` in its generation-prompt
mode, then the pipeline's batch layout): the same template, tiling and per-encoder preprocessing, the same
<IMG_CONTEXT> expansion, so a prompt at inference is token-for-token what the model saw before an answer in
training. Prompts of a batch are left-padded and decoded with the KV cache (`leo_jax.infer.generate`): greedy or
temperature / top-p sampling, stopping at the template's answer terminator or EOS.

    engine = InferenceEngine(model, config)          # e.g. from leo_jax.checkpoints.load_trained(workdir)
    engine.generate([Request.single("What color is the square?", ["img.png"])])   -> ["red"]
    chat = Chat(engine); chat.ask("What shape is the red object?", ["img.png"]); chat.ask("And how many are there?")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from leo_jax.data import packing, pipeline, sources, templates, visual
from leo_jax.data.templates import decode_answer
from leo_jax.infer.generate import SamplingConfig, continuation_logprobs, generate_from_batch, stream_from_batch

MIN_BUCKET = 64  # shortest padded prompt length; longer prompts pad to the next power of two (<= data.seq_len)
NO_SLOT_LIMIT = 1 << 20  # visual items per prompt: no fixed limit at inference


class InputError(ValueError):
    """A request the pipeline cannot turn into model inputs (missing or unreadable image, placeholder count, too
    long, ...); the message names the request and the reason."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt: LLaVA turns ({'from': 'system'|'human'|'gpt', 'value': ...}) ending with a human turn, and the
    images of its `<image>` placeholders in order (paths, encoded bytes or PIL images). `origin` names it in error
    messages (e.g. 'bench.jsonl:12')."""

    conversation: tuple[dict, ...]
    images: tuple[Any, ...] = ()
    origin: str = ""

    @classmethod
    def single(cls, prompt: str, images: Sequence[Any] = (), system_prompt: str | None = None,
               origin: str = "") -> Request:
        """A one-turn request; without `<image>` in the prompt, one placeholder per image is put first."""
        turns = ({"from": "system", "value": system_prompt},) if system_prompt is not None else ()
        return cls(turns + ({"from": "human", "value": with_placeholders(prompt, len(images))},), tuple(images),
                   origin)


def with_placeholders(text: str, num_images: int) -> str:
    """`text` with one `<image>` line per image put first, unless it already places its images itself."""
    if templates.IMAGE_PLACEHOLDER in text:
        return text
    return (templates.IMAGE_PLACEHOLDER + "\n") * num_images + text


def length_buckets(seq_len: int) -> tuple[int, ...]:
    """Padded prompt lengths: powers of two from MIN_BUCKET, ending at seq_len (few compiled shapes, short
    prompts not padded to the training row length)."""
    buckets, length = [], MIN_BUCKET
    while length < seq_len:
        buckets.append(length)
        length *= 2
    return tuple(buckets) + (seq_len,)


class InferenceEngine:
    """Batched generation for a model and its training config (sections `model` and `data`)."""

    def __init__(self, model: nnx.Module, config: ml_collections.ConfigDict):
        self.config = config
        self.kind = visual.for_model(model.cfg, config.data)
        self.graphdef, self.state = nnx.split(model)
        # A chat may gather more images and tokens than a training row holds: the transform's limits become the
        # LLM's position range and no image limit; `prepare` sizes each batch's visual slots to its requests (the
        # model takes any slot count) and pads prompts to a power-of-two bucket.
        data = ml_collections.ConfigDict(config.data.to_dict())
        data.seq_len = max(int(data.seq_len), model.language_model.cfg.max_position_embeddings)
        self.transform = pipeline.SampleTransform(data, self.kind.with_slots(NO_SLOT_LIMIT), training=False,
                                                  generation_prompt=True)
        self.tokenizer = self.transform.tokenizer
        self.stop_ids = tuple(templates.stop_token_ids(self.tokenizer, config.data.template))
        training_slots = self.kind.slots
        layout = pipeline.batch_layout(data, self.transform.kind, 1, packed=False)
        self.layout = dataclasses.replace(layout, seq_buckets=length_buckets(layout.seq_len),
                                          visual_capacity=training_slots)  # at least the training shape

    def sampling(self, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0) -> SamplingConfig:
        """Sampling options with this model's stop ids and pad id."""
        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              eos_ids=self.stop_ids, pad_id=int(self.tokenizer.pad_id))

    def prepare(self, requests: Sequence[Request]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(model batch with one request per row, prompt length per row), through the training pipeline."""
        if not requests:
            raise InputError("no requests")
        samples = []
        for index, request in enumerate(requests):
            origin = request.origin or f"request {index}"
            record = sources.Record(conversations=[dict(t) for t in request.conversation],
                                    images=list(request.images), origin=origin)
            sample = self.transform(0, (index, record))
            if pipeline.SKIP_KEY in sample:
                raise InputError(f"{origin}: {sample[pipeline.SKIP_KEY]}: {sample['detail']}")
            samples.append(sample)
        items = max(packing.num_visual_items(s, self.layout.visual_specs) for s in samples)
        layout = dataclasses.replace(self.layout, batch_size=len(samples),
                                     visual_capacity=max(items, self.layout.visual_capacity))
        batch = layout.collate([[s] for s in samples])
        lengths = batch["segment_ids"].sum(axis=1).astype(np.int32)
        return {k: v for k, v in batch.items() if k != "sample_index"}, lengths

    def generate_tokens(self, requests: Sequence[Request], sampling: SamplingConfig, seed: int = 0) -> np.ndarray:
        """New tokens [B, max_new_tokens] (pad_id after a row's stop token), by the compiled decode loop."""
        batch, lengths = self.prepare(requests)
        return np.asarray(generate_from_batch(self.graphdef, (self.state,), batch, lengths, sampling,
                                              jax.random.key(seed)))

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig | None = None,
                 seed: int = 0) -> list[str]:
        """The answer text of each request (up to its first stop id)."""
        sampling = sampling or self.sampling()
        tokens = self.generate_tokens(requests, sampling, seed)
        return [decode_answer(self.tokenizer, row, sampling.eos_ids) for row in tokens]

    def loglikelihood(self, requests: Sequence[Request], continuations: Sequence[str]) -> list[tuple[float, bool]]:
        """(log P(continuation | request's prompt), whether greedy decoding would produce it) per request. The
        continuation is the start of the answer turn (leading whitespace dropped, as the template starts the answer
        fresh) and is scored token by token, without the answer terminator."""
        if len(requests) != len(continuations):
            raise InputError(f"{len(requests)} requests but {len(continuations)} continuations")
        ids = []
        for index, text in enumerate(continuations):
            tokens = self.tokenizer.encode(text.lstrip())
            if not tokens:
                origin = requests[index].origin or f"request {index}"
                raise InputError(f"{origin}: the continuation {text!r} has no tokens to score")
            ids.append(tokens)
        batch, lengths = self.prepare(requests)
        width = max(len(t) for t in ids)
        continuation = np.full((len(ids), width), int(self.tokenizer.pad_id), np.int32)
        mask = np.zeros((len(ids), width), np.int32)
        for row, tokens in enumerate(ids):
            continuation[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
        logprobs, greedy = continuation_logprobs(self.graphdef, (self.state,), batch, lengths, continuation, mask)
        return [(float(lp), bool(g)) for lp, g in zip(np.asarray(logprobs), np.asarray(greedy))]

    def stream_tokens(self, requests: Sequence[Request], sampling: SamplingConfig, seed: int = 0
                      ) -> Iterator[np.ndarray]:
        """Each decode step's tokens [B] as they are produced (same tokens as `generate_tokens`)."""
        batch, lengths = self.prepare(requests)
        return stream_from_batch(self.graphdef, (self.state,), batch, lengths, sampling, jax.random.key(seed))

    def stream(self, request: Request, sampling: SamplingConfig | None = None, seed: int = 0) -> Iterator[str]:
        """Pieces of one request's answer text as its tokens arrive; they concatenate to its `generate` answer."""
        sampling = sampling or self.sampling()
        tokens, emitted = [], ""
        for step in self.stream_tokens([request], sampling, seed):
            tokens.append(int(step[0]))
            text = decode_answer(self.tokenizer, tokens, sampling.eos_ids)
            if tokens[-1] in sampling.eos_ids:
                break
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next token
                continue
            if len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
        if len(text) > len(emitted):
            yield text[len(emitted):]


class Chat:
    """A multi-turn conversation: every turn's request holds all previous turns (questions and the model's
    answers) and all their images, rendered by the template as one conversation."""

    def __init__(self, engine: InferenceEngine, system_prompt: str | None = None):
        self.engine = engine
        self.turns: list[dict] = [{"from": "system", "value": system_prompt}] if system_prompt is not None else []
        self.images: list[Any] = []

    def request(self, text: str, images: Sequence[Any] = ()) -> Request:
        """The request for the next user turn (history + this turn); nothing is recorded yet."""
        turn = {"from": "human", "value": with_placeholders(text, len(images))}
        return Request(tuple(self.turns) + (turn,), tuple(self.images) + tuple(images))

    def ask(self, text: str, images: Sequence[Any] = (), sampling: SamplingConfig | None = None,
            seed: int = 0) -> str:
        request = self.request(text, images)
        (answer,) = self.engine.generate([request], sampling, seed)
        self._record(request, answer)
        return answer

    def ask_stream(self, text: str, images: Sequence[Any] = (), sampling: SamplingConfig | None = None,
                   seed: int = 0) -> Iterator[str]:
        """Yields the answer's text pieces as they arrive; the turn is recorded once the answer is complete."""
        request = self.request(text, images)
        pieces = []
        for piece in self.engine.stream(request, sampling, seed):
            pieces.append(piece)
            yield piece
        self._record(request, "".join(pieces).strip())

    def _record(self, request: Request, answer: str) -> None:
        self.turns = list(request.conversation) + [{"from": "gpt", "value": answer}]
        self.images = list(request.images)
