"""Tokenizers behind one small interface: a Hugging Face `tokenizer.json` or a SentencePiece `.model`.

Both give `encode` (never adds BOS/EOS implicitly), `encode_with_offsets` (character spans, used by the
conversation templates to decide which tokens are supervised), `decode`, `add_special_tokens`
(atomic tokens such as `<IMG_CONTEXT>`; ids are logged), `token_to_id`, `vocab_size` and the
bos/eos/pad ids. The tokenizer that ships with the package for the synthetic data set lives at
`SYNTHETIC_TOKENIZER_PATH` (rebuild it with `python -m leo_jax.data.assets.build_synthetic_tokenizer`).
"""
from __future__ import annotations

import abc
import logging
import os
import re
from collections.abc import Sequence

from leo_jax.jsonfile import read_json

logger = logging.getLogger(__name__)

SYNTHETIC_TOKENIZER_PATH = os.path.join(os.path.dirname(__file__), "assets", "synthetic_tokenizer.json")

# Names tried, in order, when neither the caller nor tokenizer_config.json names the token.
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")

Offsets = list[tuple[int, int]]


class Tokenizer(abc.ABC):
    """Common interface; subclasses wrap one tokenizer library."""

    def __init__(self, name: str):
        self.name = name
        self.bos_id: int | None = None
        self.eos_id: int | None = None
        self.pad_id: int | None = None
        self._is_special_cache: dict[str, bool] = {}  # cleared whenever tokens are added

    # --- implemented by each backend -------------------------------------------------------------
    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], Offsets]:
        """Token ids and their [start, end) character spans in `text`; no BOS/EOS added."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are written out unless skipped."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of `token` as one vocabulary entry, or None."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of `token_id`, or None."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids including added tokens (the embedding table needs at least this many rows)."""

    @abc.abstractmethod
    def _add_special_token(self, token: str) -> tuple[int, bool]:
        """Register `token` as atomic; returns (id, newly_added)."""

    @abc.abstractmethod
    def export(self, out_dir: str, add_bos: bool) -> dict:
        """Writes the tokenizer file (added tokens included) into `out_dir` so that transformers' AutoTokenizer
        gives the same ids, BOS first when `add_bos`; returns the tokenizer_config.json entries it needs."""

    # --- shared ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added."""
        return self.encode_with_offsets(text)[0]

    def add_special_tokens(self, tokens: Sequence[str]) -> dict[str, int]:
        """Make each token atomic (never split, matched in text); returns and logs token -> id."""
        ids = {}
        for token in tokens:
            token_id, added = self._add_special_token(token)
            self._is_special_cache.clear()
            ids[token] = token_id
            # new tokens change the vocabulary: always reported; known ones only at debug level (the pipeline
            # loads the tokenizer in every reader, so this would otherwise repeat at each evaluation)
            logger.log(logging.INFO if added else logging.DEBUG, "tokenizer %s: special token %r -> id %d (%s)",
                       self.name, token, token_id, "added" if added else "already present")
        return ids

    def is_special(self, token: str) -> bool:
        """True when `token` is one vocabulary id and text containing it encodes to exactly that id."""
        if token not in self._is_special_cache:
            token_id = self.token_to_id(token)
            self._is_special_cache[token] = token_id is not None and self.encode(token) == [token_id]
        return self._is_special_cache[token]

    def _resolve_special_ids(self, bos_token, eos_token, pad_token, config: dict) -> None:
        """Sets bos/eos/pad ids: explicit argument > tokenizer_config.json > the backend's own > well-known names."""

        def pick(explicit, config_key, current, candidates):
            name = explicit or _config_token(config.get(config_key))
            if name is not None:
                token_id = self.token_to_id(name)
                if token_id is None:
                    raise ValueError(f"tokenizer {self.name}: {config_key} {name!r} is not in the vocabulary; "
                                     f"pass the right {config_key} to load_tokenizer")
                return token_id
            if current is not None:
                return current
            return next((self.token_to_id(c) for c in candidates if self.token_to_id(c) is not None), None)

        self.bos_id = pick(bos_token, "bos_token", self.bos_id, _BOS_CANDIDATES)
        self.eos_id = pick(eos_token, "eos_token", self.eos_id, _EOS_CANDIDATES)
        self.pad_id = pick(pad_token, "pad_token", self.pad_id, _PAD_CANDIDATES)
        if self.pad_id is None:
            # Padding is masked out everywhere (segment id 0), so any valid id will do.
            self.pad_id = self.eos_id if self.eos_id is not None else 0
            logger.info("tokenizer %s has no pad token; padding with id %d", self.name, self.pad_id)
        logger.debug("tokenizer %s: vocab_size=%d bos=%s eos=%s pad=%s", self.name, self.vocab_size,
                    self.bos_id, self.eos_id, self.pad_id)


def _config_token(value) -> str | None:
    """tokenizer_config.json stores tokens as strings or as {'content': ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer(Tokenizer):
    """A `tokenizers` library tokenizer loaded from a `tokenizer.json` file."""

    def __init__(self, path: str):
        import tokenizers

        super().__init__(path)
        self._tok = tokenizers.Tokenizer.from_file(path)

    def encode_with_offsets(self, text):
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids, skip_special_tokens=False):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id):
        return self._tok.id_to_token(int(token_id))

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _add_special_token(self, token):
        import tokenizers

        before = self.vocab_size
        if self.is_special(token):
            return self.token_to_id(token), False
        self._tok.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])
        return self.token_to_id(token), self.vocab_size > before

    def save(self, path: str) -> None:
        """Writes the tokenizer (with any added tokens) as a tokenizer.json."""
        self._tok.save(path)

    def export(self, out_dir, add_bos):
        import tokenizers

        tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
        if add_bos and self.bos_id is not None:
            bos = self.id_to_token(self.bos_id)
            tok.post_processor = tokenizers.processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, self.bos_id)])
        tok.save(os.path.join(out_dir, "tokenizer.json"))
        return {"tokenizer_class": "PreTrainedTokenizerFast"}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; special tokens are split out of the text before SentencePiece sees it.

    As with Hugging Face's slow Llama tokenizer, each text chunk between special tokens is encoded on
    its own (so it gets SentencePiece's dummy-prefix space). Added tokens that are not pieces of the
    model get ids after the model's last piece.
    """

    def __init__(self, path: str):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        super().__init__(path)
        self._sp = spm.SentencePieceProcessor(model_file=path)
        proto = sentencepiece_model_pb2.ModelProto.FromString(self._sp.serialized_model_proto())
        atomic_types = (proto.SentencePiece.CONTROL, proto.SentencePiece.USER_DEFINED)
        self._special = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in atomic_types}
        self._added: list[str] = []  # tokens beyond the model's pieces, in id order
        self._special_re = None
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None

    def _splitter(self):
        if self._special_re is None:
            names = sorted(self._special, key=len, reverse=True)
            self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        return self._special_re

    def encode_with_offsets(self, text):
        ids, offsets, pos = [], [], 0
        splitter = self._splitter()
        chunks = splitter.split(text) if splitter else [text]
        for i, chunk in enumerate(chunks):
            if i % 2 == 1:  # a special token (odd positions of re.split with one group)
                ids.append(self._special[chunk])
                offsets.append((pos, pos + len(chunk)))
            elif chunk:
                char_of_byte = _byte_to_char_index(chunk)
                for piece in self._sp.encode(chunk, return_type="proto").pieces:
                    ids.append(piece.id)
                    offsets.append((pos + char_of_byte[piece.begin], pos + char_of_byte[piece.end]))
            pos += len(chunk)
        return ids, offsets

    def decode(self, ids, skip_special_tokens=False):
        by_id = {i: s for s, i in self._special.items()}
        parts, run = [], []
        for token_id in map(int, ids):
            if token_id in by_id:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(by_id[token_id])
            else:
                run.append(token_id)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token):
        if token in self._special:
            return self._special[token]
        token_id = self._sp.piece_to_id(token)
        return None if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id) else token_id

    def id_to_token(self, token_id):
        token_id = int(token_id)
        base = self._sp.get_piece_size()
        if token_id < base:
            return self._sp.id_to_piece(token_id)
        return self._added[token_id - base] if token_id - base < len(self._added) else None

    @property
    def vocab_size(self):
        return self._sp.get_piece_size() + len(self._added)

    def _add_special_token(self, token):
        if token in self._special:
            return self._special[token], False
        existing = self.token_to_id(token)
        added = existing is None
        token_id = self.vocab_size if added else existing
        if added:
            self._added.append(token)
        self._special[token] = token_id
        self._special_re = None
        return token_id, added


    def export(self, out_dir, add_bos):
        with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
            f.write(self._sp.serialized_model_proto())
        added = {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                          "single_word": False} for t, i in sorted(self._special.items(), key=lambda kv: kv[1])}
        return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": bool(add_bos and self.bos_id is not None),
                "add_eos_token": False, "legacy": True, "added_tokens_decoder": added}

    def register_added_tokens(self, added_tokens_decoder: dict, source: str) -> None:
        """Registers tokenizer_config.json's `added_tokens_decoder` ({id: {'content': ...}}) at exactly those ids."""
        for token_id, entry in sorted(((int(i), e) for i, e in added_tokens_decoder.items())):
            token = _config_token(entry)
            if token_id < self._sp.get_piece_size():
                if self.token_to_id(token) != token_id:
                    raise ValueError(f"{source}: added token {token!r} claims id {token_id}, but the SentencePiece "
                                     f"model has {self._sp.id_to_piece(token_id)!r} there")
                self._special[token] = token_id
            elif token not in self._special:
                if token_id != self.vocab_size:
                    raise ValueError(f"{source}: added token ids must continue the SentencePiece vocabulary "
                                     f"without gaps; {token!r} has id {token_id}, expected {self.vocab_size}")
                self.add_special_tokens([token])
        self._special_re = None


def _byte_to_char_index(text: str) -> list[int]:
    """index[b] = character index of UTF-8 byte offset b (len(text.encode()) + 1 entries)."""
    index = []
    for char_pos, char in enumerate(text):
        index.extend([char_pos] * len(char.encode("utf-8")))
    index.append(len(text))
    return index


def load_tokenizer(path: str, *, bos_token: str | None = None, eos_token: str | None = None,
                   pad_token: str | None = None) -> Tokenizer:
    """Loads a local tokenizer: a `tokenizer.json`, a SentencePiece `.model`, or a directory holding one.

    bos/eos/pad come from the arguments, else the directory's tokenizer_config.json, else well-known
    token names (pad falls back to eos: padding is always masked).
    """
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                file_path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path} holds neither tokenizer.json nor tokenizer.model; "
                                    "point --config.data.tokenizer at a Hugging Face tokenizer.json or a "
                                    "SentencePiece .model file")
    elif os.path.isfile(path):
        file_path = path
    else:
        raise FileNotFoundError(f"tokenizer not found: {path}")

    if file_path.endswith(".json"):
        tokenizer: Tokenizer = HFTokenizer(file_path)
    elif file_path.endswith(".model"):
        tokenizer = SentencePieceTokenizer(file_path)
    else:
        raise ValueError(f"unknown tokenizer file type: {file_path} (expected tokenizer.json or a "
                         "SentencePiece .model)")

    config_path = os.path.join(os.path.dirname(file_path), "tokenizer_config.json")
    config = read_json(config_path, "the tokenizer's special tokens", "fix or replace it") \
        if os.path.isfile(config_path) else {}
    if isinstance(tokenizer, SentencePieceTokenizer):
        tokenizer.register_added_tokens(config.get("added_tokens_decoder", {}), config_path)
    tokenizer._resolve_special_ids(bos_token, eos_token, pad_token, config)
    return tokenizer
