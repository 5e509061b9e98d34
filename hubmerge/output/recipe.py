"""``hubmerge.json``: the machine-readable record of a merge (inputs with their hashes, scaling, formats, tool
versions) and the SHA256 of every file written, so a result can be verified and reproduced later.

It holds no timestamps and no local paths of the user's machine beyond what they typed, so that the same merge
gives the same file.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..jsonio import load_json
from ..verification.hashing import file_digest

if TYPE_CHECKING:
    from ..inputs.loading import Inputs
    from ..inputs.sources import Source
    from ..plan import MergePlan

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
    """Read ``hubmerge.json`` from ``folder``.

    Raises:
        InputError: naming the file, when it is missing, unreadable, too large or malformed JSON.
    """
    path = folder / RECIPE_NAME
    if not path.is_file():
        raise InputError(f"{folder}: no {RECIPE_NAME}; only folders written by hubmerge have one")
    return load_json(path)


def reproduce_command(recipe: Mapping[str, Any], *, wrapped: bool = False) -> str:
    """The ``hubmerge`` command line that makes the same files from a recipe: every Hub source pinned to the commit
    it was read at (local folders as they were typed), the same dtype, formats and shard limits.

    Args:
        recipe: a ``hubmerge.json`` mapping (the keys ``base``, ``adapters``, ``merge`` and ``formats`` are used).
        wrapped: one input per line, joined by shell line continuations (for reading in a model card).
    Returns:
        the command, each argument quoted only where the shell needs it.
    """
    import shlex

    from ..constants import DEFAULT_MAX_SHARD_SIZE
    from ..sizes import parse_size

    def spec(source: Mapping[str, Any]) -> str:
        return f"{source['repo_id']}@{source['commit']}" if source.get("repo_id") else str(source["source"])

    formats = recipe.get("formats") or {"hf": {}}
    options = ["--dtype", str(recipe["merge"]["dtype"]), "--format", ",".join(formats)]
    shard = (formats.get("hf") or {}).get("max_shard_size")
    if shard and shard != parse_size(DEFAULT_MAX_SHARD_SIZE):
        options += ["--max-shard-size", str(shard)]
    pth_shards = (formats.get("pth") or {}).get("shards")
    if pth_shards:
        options += ["--pth-shards", str(pth_shards)]
    groups = [["hubmerge"], *([spec(a)] for a in recipe["adapters"]), ["--base", spec(recipe["base"])], options]
    lines = [" ".join(shlex.quote(a) for a in group) for group in groups]
    return " \\\n    ".join(lines) if wrapped else " ".join(lines)


def source_license(folder: Path | None) -> str | None:
    """The ``license`` a source's README.md front matter states, if any."""
    readme = folder / "README.md" if folder else None
    if readme is None or not readme.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        return (metadata_load(readme) or {}).get("license")
    except Exception:  # a malformed card must not stop a merge; the license is then simply not carried over
        return None


def input_files(plan: MergePlan) -> list[list[Path]]:
    """The files each input contributes, base first: what the recipe hashes."""
    files = [list(plan.base.files)]
    for a in plan.adapters:
        files.append(a.files)
    return files


def hash_inputs(plan: MergePlan, sources: Sequence[Source]) -> None:
    """Fill in the SHA256 of every input file not already known (Hub downloads come verified with theirs)."""
    for src, files in zip(sources, input_files(plan)):
        for path in files:
            if path.name not in src.hashes:
                src.hashes[path.name] = file_digest(path)


def build_recipe(plan: MergePlan, inputs: Inputs, formats: dict, files: dict) -> dict[str, Any]:
    """The recipe of a finished write: every input pinned and hashed, the scaling, the formats, each file's SHA256."""

    def source_record(src: Source, files_in: Sequence[Path]) -> dict:
        record: dict[str, Any] = {"source": src.spec}
        if src.repo_id:
            record.update(repo_id=src.repo_id, revision=src.revision, commit=src.commit)
        record["files"] = {p.name: src.hashes[p.name] for p in files_in}
        record["license"] = source_license(src.path)
        return record

    per_input = input_files(plan)
    adapters = []
    for src, a, files_in in zip(inputs.adapter_sources, plan.adapters, per_input[1:]):
        record = source_record(src, files_in)
        record.update(
            layout=a.layout,
            r=a.r,
            lora_alpha=a.lora_alpha,
            use_rslora=a.use_rslora,
            kinds=a.kinds,
            scaling=sorted({round(scale, 8) for scale in a.scales}),
            replaces=sorted(a.replacements),
            vocab_size=a.vocab_size,
        )
        adapters.append(record)
    tokenizer = next((a.label for a in reversed(plan.adapters) if a.tokenizer is plan.tokenizer), "base")
    return {
        "base": source_record(inputs.base_source, per_input[0]),
        "adapters": adapters,
        "merge": {
            "family": plan.base.arch.model_type,
            "dtype": plan.dtype_name,
            "vocab_size": plan.vocab_size,
            "tokenizer": tokenizer,
            "tensors": len(plan.tensors),
            "changed": sum(t.changed for t in plan.tensors),
        },
        "formats": formats,
        "tools": tool_versions(),
        "files": files,
    }
