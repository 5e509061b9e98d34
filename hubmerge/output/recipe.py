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
    """Write ``hubmerge.json`` into ``folder``, with the command that reproduces a merge; returns its path."""
    path = folder / RECIPE_NAME
    record = {"hubmerge_recipe": RECIPE_VERSION, **recipe}
    if recipe.get("adapters"):  # a conversion (no adapters) has no merge command to repeat
        record["command"] = reproduce_command(recipe)
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_recipe(folder: Path) -> dict[str, Any]:
    """Read ``hubmerge.json`` from ``folder`` (raises OSError / ValueError as json does)."""
    return json.loads((folder / RECIPE_NAME).read_text(encoding="utf-8"))


def reproduce_command(recipe: Mapping[str, Any]) -> str:
    """The ``hubmerge`` command line that makes the same files from a recipe: every Hub source pinned to the commit
    it was read at (local folders as they were typed), the same dtype, formats and shard limits.

    Args:
        recipe: a ``hubmerge.json`` mapping (the keys ``base``, ``adapters``, ``merge`` and ``formats`` are used).
    Returns:
        one shell line, each argument quoted only where the shell needs it.
    """
    import shlex

    def spec(source: Mapping[str, Any]) -> str:
        return f"{source['repo_id']}@{source['commit']}" if source.get("repo_id") else str(source["source"])

    formats = recipe.get("formats") or {"hf": {}}
    args = ["hubmerge", *(spec(a) for a in recipe["adapters"]), "--base", spec(recipe["base"])]
    args += ["--dtype", str(recipe["merge"]["dtype"]), "--format", ",".join(formats)]
    shard = (formats.get("hf") or {}).get("max_shard_size")
    if shard:
        args += ["--max-shard-size", str(shard)]
    pth_shards = (formats.get("pth") or {}).get("shards")
    if pth_shards:
        args += ["--pth-shards", str(pth_shards)]
    return " ".join(shlex.quote(a) for a in args)
