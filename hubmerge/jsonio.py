"""Reading JSON from strangers: one bounded, strict parser for every JSON file and header hubmerge reads.

Python's ``json`` accepts ``Infinity``/``NaN``, lets a repeated key silently win, and nests until the interpreter's
recursion limit (then raises RecursionError, and anything walking the result recursively fails later). Its memory
grows to 7-20x the text. So every file kind has a size limit that real files fit with room, nesting is bounded,
the non-standard constants are refused, and any failure is one :class:`~hubmerge.errors.InputError` line naming
the file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import CorruptFileError, InputError

_MiB = 1024 * 1024
# Largest accepted size per file name. Real files: configs a few KB; tokenizer.json up to ~35 MB (262k-token
# vocabularies), tokenizer_config.json with every added token ~5 MB, weight indexes ~2 MB for the largest models.
JSON_LIMITS: dict[str, int] = {
    "tokenizer.json": 64 * _MiB,
    "tokenizer_config.json": 16 * _MiB,
    "added_tokens.json": 16 * _MiB,
    "model.safetensors.index.json": 16 * _MiB,
    "pytorch_model.bin.index.json": 16 * _MiB,
    "hubmerge.json": 16 * _MiB,
}
DEFAULT_LIMIT = _MiB  # adapter_config.json, config.json, params.json, special_tokens_map.json, ...
MAX_DEPTH = 64  # real files nest at most ~8 deep


class _Refused(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        twice = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise _Refused(f"key {twice[:80]!r} appears twice")
    return found


def _depth_ok(data: Any) -> bool:
    todo = [(data, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > MAX_DEPTH:
            return False
        children = value.values() if isinstance(value, dict) else value
        todo.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


def parse_json(raw: bytes | str, where: str, *, unique_keys: bool = False, corrupt: bool = False) -> dict[str, Any]:
    """Parse a JSON object strictly: no Infinity/NaN, nesting at most :data:`MAX_DEPTH`, with ``unique_keys`` no key
    twice in an object.

    Args:
        raw: the text. where: the file (or "file: part") named in errors.
        corrupt: raise CorruptFileError (a damaged weight file) instead of InputError.
    Returns:
        the object.
    Raises:
        InputError / CorruptFileError: naming ``where``, the problem and the fix.
    """
    error = CorruptFileError if corrupt else InputError
    fix = "download or copy it again" if corrupt else "restore the original file"
    try:
        data = json.loads(raw, parse_constant=_no_constant, object_pairs_hook=_unique if unique_keys else None)
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply; {fix}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # _Refused, JSONDecodeError and bad UTF-8 are all ValueErrors
        raise error(f"{where}: not valid JSON ({str(exc)[:200]}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{where}: expected a JSON object, found {type(data).__name__}; {fix}")
    if not _depth_ok(data):
        raise error(f"{where}: JSON nested deeper than {MAX_DEPTH} levels; {fix}")
    return data


def load_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, read no further than the limit for its name (:data:`JSON_LIMITS`).

    Raises:
        InputError: naming the file, when unreadable, too large, malformed, too deep, or not an object.
    """
    path = Path(path)
    limit = JSON_LIMITS.get(path.name, DEFAULT_LIMIT)
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1) if os.fstat(f.fileno()).st_size <= limit else None  # never read a huge file
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror}); check the file exists and is readable") from None
    if raw is None or len(raw) > limit:
        raise InputError(
            f"{path}: larger than {limit // _MiB} MiB, far beyond any real {path.name}; restore the original file"
        )
    return parse_json(raw, str(path))


def json_field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path | str, default: Any = None):
    """``data[key]`` checked to be of ``kind`` (bool never counts as a number); ``default`` when absent or null.

    Raises:
        InputError: naming the file and the key, when the value has another type.
    """
    value = data.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(
            {
                dict: "an object",
                list: "a list",
                str: "a string",
                int: "an integer",
                float: "a number",
                bool: "true/false",
            }[k]
            for k in kinds
        )
        raise InputError(f"{where}: {key!r} must be {names}, found {type(value).__name__}; restore the original file")
    return value


def index_weight_map(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name -> shard file name.

    Raises:
        InputError: naming the index, when it is unreadable or its weight_map is not a map of file names.
    """
    weight_map = json_field(load_json(path), "weight_map", dict, path)
    if not weight_map or not all(isinstance(f, str) and f for f in weight_map.values()):
        raise CorruptFileError(
            f"{path}: not a valid weight index (weight_map of file names); restore the original file"
        )
    return weight_map
