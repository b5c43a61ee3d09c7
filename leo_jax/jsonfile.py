"""Reading and writing the JSON files a model or checkpoint directory holds; read errors name the file and what to
do.

Imports nothing but the standard library, so every layer, and `leo_jax.pytorch` (which never imports JAX), reads
its files through this one reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike, missing: str, fix: str, error: type[Exception] | None = None) -> Any:
    """The JSON value in `path`.

    A missing file raises FileNotFoundError "<path> not found: <missing>" (`missing` says why the file is needed and
    how to get it); invalid JSON raises ValueError "<path> is not valid JSON (<reason> at line L column C); <fix>".
    `error`, when given, is raised in both cases instead (a caller's own ValueError subclass).
    """
    path = Path(path)
    if not path.is_file():
        raise (error or FileNotFoundError)(f"{path} not found: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise (error or ValueError)(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                                    f"{fix}") from e


def write_json(path: str | os.PathLike, value: Any, sort_keys: bool = True) -> None:
    """`value` as indented JSON with a final newline (non-ASCII text as is, as Hugging Face's files write it)."""
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")
