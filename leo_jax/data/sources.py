"""Random-access data sources of LLaVA-style conversations for Grain.

Two on-disk forms are read:

* LLaVA JSON / JSONL (LLaVA-Pretrain-558K, LLaVA-665K, Eagle): each record has ``conversations`` (a list of
  ``{"from": "human"|"gpt", "value": ...}`` turns with ``<image>`` placeholders; ShareGPT's ``user``/``assistant``
  roles and a leading ``system`` turn are accepted) and optionally ``image``, a path or a list of paths relative to
  an image root, and ``system``, a system prompt (ShareGPT style). Text-only records simply have no ``image``.
* ArrayRecord shards written by :mod:`leo_jax.data.to_arrayrecord` (images stored as encoded bytes).

Both sources return :class:`Record` objects. A record that cannot be parsed does not raise inside the input
pipeline (that would kill a pod run for one bad line): it carries ``error`` and ``origin`` so the pipeline can
count and log it (see ``pipeline.SkipStats``).

The JSON sources index their file once into an int64 array of byte spans and parse one record per access, so a
1.8M-line JSONL costs a few MB of index instead of millions of Python dicts, and the source pickles cheaply into
Grain worker processes (only the path and the index travel).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

# Skip reasons a source can report; the pipeline adds the image- and length-related ones.
MALFORMED_JSON = "malformed_json"
MALFORMED_RECORD = "malformed_record"

ROLE_KEY, TEXT_KEY = "from", "value"
SYSTEM_ROLE = "system"


@dataclasses.dataclass(frozen=True)
class Record:
    """One conversation sample as read from disk.

    images: absolute file paths (JSON sources) or encoded image bytes (ArrayRecord); empty for text-only.
    origin: where the record came from, e.g. ``data.jsonl:line 17`` - used in skip logs and error messages.
    error: a parse failure ``(reason, detail)``; when set, ``conversations`` is empty and the record is skipped.
    """

    conversations: list[dict[str, str]]
    images: list[str | bytes]
    origin: str
    sample_id: str = ""
    error: tuple[str, str] | None = None


def record_from_json(obj: Any, image_root: str, origin: str) -> Record:
    """Validate one decoded LLaVA record and resolve its image paths against ``image_root``."""
    if not isinstance(obj, dict):
        return _error_record(origin, MALFORMED_RECORD, f"expected a JSON object, got {type(obj).__name__}")
    conversations = obj.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return _error_record(origin, MALFORMED_RECORD, "missing or empty 'conversations' list")
    for turn_index, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and isinstance(turn.get(ROLE_KEY), str) and isinstance(turn.get(TEXT_KEY), str)):
            return _error_record(
                origin, MALFORMED_RECORD, f"conversations[{turn_index}] needs string fields 'from' and 'value'"
            )
    image = obj.get("image")
    if image is None:
        names: list[str] = []
    elif isinstance(image, str):
        names = [image]
    elif isinstance(image, list) and all(isinstance(name, str) for name in image):
        names = list(image)
    else:
        return _error_record(origin, MALFORMED_RECORD, "'image' must be a path string or a list of path strings")
    turns = [{ROLE_KEY: t[ROLE_KEY], TEXT_KEY: t[TEXT_KEY]} for t in conversations]
    system = obj.get("system")  # ShareGPT-style sets carry the system prompt as a record field
    if system is not None:
        if not isinstance(system, str):
            return _error_record(origin, MALFORMED_RECORD, "'system' must be a string")
        if turns[0][ROLE_KEY] == SYSTEM_ROLE:
            return _error_record(origin, MALFORMED_RECORD, "both a 'system' field and a leading system turn")
        turns.insert(0, {ROLE_KEY: SYSTEM_ROLE, TEXT_KEY: system})
    return Record(
        conversations=turns,
        images=[os.path.join(image_root, name) for name in names],
        origin=origin,
        sample_id=str(obj.get("id", "")),
    )


def _error_record(origin: str, reason: str, detail: str) -> Record:
    return Record(conversations=[], images=[], origin=origin, error=(reason, detail))


_SCAN_CHUNK_BYTES = 1 << 26  # scan JSONL files 64 MiB at a time to bound index-building memory


def _jsonl_spans(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte spans [start, end) of the non-blank lines of a JSONL file and their 1-based line numbers."""
    size = os.path.getsize(path)
    if size == 0:
        return np.zeros((0, 2), np.int64), np.zeros((0,), np.int64)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        chunks = []
        for offset in range(0, size, _SCAN_CHUNK_BYTES):
            chunk = np.frombuffer(mapped, np.uint8, count=min(_SCAN_CHUNK_BYTES, size - offset), offset=offset)
            chunks.append(np.flatnonzero(chunk == ord("\n")) + offset)
            del chunk  # release the buffer export before the mmap closes
        newlines = np.concatenate(chunks)
        starts = np.concatenate([[0], newlines + 1])
        ends = np.concatenate([newlines, [size]])
        # Blank lines (empty, or whitespace only) carry no record; only lines starting with whitespace need a look.
        keep = ends > starts
        view = np.frombuffer(mapped, np.uint8)
        first_bytes = view[np.minimum(starts, size - 1)]
        del view
        starts_with_space = keep & np.isin(first_bytes, np.frombuffer(b" \t\r", np.uint8))
        for line in np.flatnonzero(starts_with_space):
            keep[line] = bool(mapped[int(starts[line]) : int(ends[line])].strip())
    spans = np.stack([starts[keep], ends[keep]], axis=1).astype(np.int64)
    return spans, (np.flatnonzero(keep) + 1).astype(np.int64)


def _json_array_spans(path: str) -> np.ndarray:
    """Byte spans of the top-level elements of a JSON array file, found with one streaming decode pass.

    The bytes are decoded as latin-1 so character offsets equal byte offsets (UTF-8 multi-byte sequences never
    contain JSON structural characters); the decoded objects are thrown away, records are re-read on access.
    """
    with open(path, "rb") as f:
        text = f.read().decode("latin-1")
    decoder = json.JSONDecoder()
    spans = []
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise ValueError(f"{path}: a .json data file must hold a JSON array of records (LLaVA format)")
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return np.zeros((0, 2), np.int64)
    while True:
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: invalid JSON in record {len(spans)} at byte {e.pos}: {e.msg}. A .json file must parse as a "
                "whole; fix it, or convert to JSONL so bad lines are skipped one by one."
            ) from e
        spans.append((pos, end))
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos < len(text) and text[pos] == "]":
            break
        else:
            raise ValueError(f"{path}: expected ',' or ']' after record {len(spans) - 1} at byte {pos}")
    return np.asarray(spans, np.int64)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


class LlavaJsonSource:
    """Grain random-access source over a LLaVA JSON array file or a JSONL file; the one reader of JSON / JSONL record
    files (training data, the trainer's evaluation records, benchmark files through ``raw``).

    image_root: directory the records' ``image`` paths are relative to (default: the annotation file's directory).
    jsonl: read one JSON value per line; default: by the file name (``.jsonl``, else ``.json``, an array).
    A malformed JSONL line becomes an error record (skipped and counted downstream); a malformed ``.json`` file
    fails at construction, since its records cannot be delimited.
    """

    def __init__(self, path: str, image_root: str | None = None, jsonl: bool | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path} (set data.train_files / data.eval_files)")
        self.path = path
        self.image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
        if jsonl or (jsonl is None and path.endswith(".jsonl")):
            self._spans, self._line_numbers = _jsonl_spans(path)
        elif jsonl is False or path.endswith(".json"):
            self._spans, self._line_numbers = _json_array_spans(path), None
        else:
            raise ValueError(f"{path}: unknown annotation format; expected a .json (array) or .jsonl file")
        self._fd = None

    def __len__(self) -> int:
        return len(self._spans)

    def line_number(self, index: int) -> int | None:
        """1-based line of record ``index`` in a JSONL file (None for a JSON array)."""
        return None if self._line_numbers is None else int(self._line_numbers[index])

    def raw(self, index: int) -> Any:
        """The parsed JSON value of record ``index``; json.JSONDecodeError or UnicodeDecodeError (both ValueErrors)
        when it is malformed."""
        start, end = (int(v) for v in self._spans[index])
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return json.loads(os.pread(self._fd, end - start, start))  # positional read: thread-safe

    def __getitem__(self, index: int) -> Record:
        line = self.line_number(index)
        origin = f"{self.path}:line {line}" if line is not None else f"{self.path}:record {index}"
        try:
            obj = self.raw(index)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error_record(origin, MALFORMED_JSON, str(e))
        return record_from_json(obj, self.image_root, origin)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None  # file descriptors do not cross process boundaries; reopened lazily
        return state

    def __repr__(self) -> str:
        return f"LlavaJsonSource({self.path!r}, image_root={self.image_root!r}, records={len(self)})"


class ArrayRecordSource:
    """Grain random-access source over ArrayRecord shards written by :mod:`leo_jax.data.to_arrayrecord`.

    dataset_dir: the TFDS version directory (holding ``dataset_info.json`` and ``*.array_record-*`` shards).
    Reads go through TFDS' ArrayRecord data source (random access, no TensorFlow) and are decoded with the
    dataset's own feature spec.
    """

    def __init__(self, dataset_dir: str, split: str = "train"):
        if not os.path.isfile(os.path.join(dataset_dir, "dataset_info.json")):
            raise FileNotFoundError(
                f"{dataset_dir} is not a TFDS dataset directory (no dataset_info.json); build one with "
                "`python -m leo_jax.data.to_arrayrecord`"
            )
        self.dataset_dir = dataset_dir
        self.split = split
        self._source = None
        self._length = len(self._records())

    def _records(self):
        if self._source is None:
            import tensorflow_datasets as tfds  # heavy import, only for ArrayRecord data

            builder = tfds.builder_from_directory(self.dataset_dir)
            splits = builder.as_data_source()
            if self.split not in splits:
                raise KeyError(f"{self.dataset_dir} has no split {self.split!r}; available: {sorted(splits)}")
            self._source = splits[self.split]
        return self._source

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Record:
        example = self._records()[index]
        origin = f"{self.dataset_dir}[{self.split}]:record {index}"
        try:
            obj = json.loads(example["conversations"])
        except json.JSONDecodeError as e:
            return _error_record(origin, MALFORMED_JSON, str(e))
        parsed = record_from_json({"conversations": obj}, "", origin)
        if parsed.error is not None:
            return parsed
        return dataclasses.replace(
            parsed, images=[bytes(b) for b in example["image_bytes"]], sample_id=_as_text(example["id"])
        )

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.dataset_dir!r}, split={self.split!r}, records={len(self)})"


def _as_text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class ConcatSource:
    """Several sources read back to back as one (e.g. the shards of an SFT mix)."""

    def __init__(self, sources: Sequence[Any]):
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        self.sources = list(sources)
        self._offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        which = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.sources[which][index - int(self._offsets[which])]


def local_copy(path: str) -> str:
    """``path`` itself when local; for a remote annotation file (gs://... or any etils.epath / fsspec URL) a copy in
    the local cache directory, made once per file version (the sources read records by byte offset)."""
    if "://" not in path:
        return path
    remote = epath.Path(path)
    if not remote.exists():
        raise FileNotFoundError(f"data file not found: {path} (set data.train_files / data.eval_files)")
    stat = remote.stat()
    key = hashlib.sha256(f"{path} {stat.length} {stat.mtime}".encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), "leo_jax_remote", key, os.path.basename(path))
    if not os.path.exists(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        partial = f"{local}.{os.getpid()}.partial"
        with open(partial, "wb") as f:
            f.write(remote.read_bytes())
        os.replace(partial, local)
    return local


def open_source(path: str, image_root: str | None = None, split: str = "train"):
    """A source for ``path``: a ``.json``/``.jsonl`` annotation file (local or remote, e.g. gs://; images are then
    read from the remote file's directory unless ``image_root`` says otherwise), or a TFDS ArrayRecord dataset
    directory."""
    if "://" in path:
        return LlavaJsonSource(local_copy(path), image_root=image_root or path.rsplit("/", 1)[0])
    if os.path.isdir(path):
        return ArrayRecordSource(path, split=split)
    return LlavaJsonSource(path, image_root=image_root)


def open_sources(paths: Sequence[str] | str, image_roots: Sequence[str | None] | str | None = None, split="train"):
    """One source over several files (comma-separated string or list), each with its own image root."""
    if isinstance(paths, str):
        paths = [p.strip() for p in paths.split(",") if p.strip()]
    if not paths:
        raise ValueError("no data files given (set data.train_files)")
    if image_roots is None or isinstance(image_roots, str):
        image_roots = [image_roots or None] * len(paths)
    if len(image_roots) != len(paths):
        raise ValueError(f"got {len(paths)} data files but {len(image_roots)} image roots")
    sources = [open_source(p, r, split) for p, r in zip(paths, image_roots)]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)
