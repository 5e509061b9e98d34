"""``hubmerge.json``: the machine-readable record of a merge (inputs with their hashes, scaling, formats, tool
versions) and the SHA256 of every file written, so a result can be verified and reproduced later.

It holds no timestamps and no local paths of the user's machine beyond what they typed, so that the same merge
gives the same file.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..jsonio import load_json

RECIPE_NAME = "hubmerge.json"
RECIPE_VERSION = 1


def tool_versions() -> dict[str, str]:
    """Versions of the packages that shape the output bytes."""
    versions = {"python": platform.python_version()}
    for pkg in ("hubmerge", "torch", "safetensors", "huggingface_hub", "sentencepiece", "gguf"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions


def write_recipe(folder: Path, recipe: Mapping[str, Any]) -> Path:
    """Write ``hubmerge.json`` into ``folder``; returns its path."""
    path = folder / RECIPE_NAME
    path.write_text(
        json.dumps({"hubmerge_recipe": RECIPE_VERSION, **recipe}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return path


def read_recipe(folder: Path) -> dict[str, Any]:
    """Read ``hubmerge.json`` from ``folder``.

    Raises:
        InputError: naming the file, when it is missing, unreadable, too large or malformed JSON.
    """
    path = folder / RECIPE_NAME
    if not path.is_file():
        raise InputError(f"{folder}: no {RECIPE_NAME}; only folders written by hubmerge have one")
    return load_json(path)
