"""Output writers. Each is built from a :class:`~hubmerge.plan.MergePlan` (and checks it can represent it before
creating any file), then receives the merge's blocks in order, and on ``close()`` returns the files it wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import InputError

if TYPE_CHECKING:  # the registry stays importable without torch, so `hubmerge --help` starts fast
    from ...merging import Block
    from ...plan import MergePlan

FORMATS = ("hf", "pth", "gguf")


class Writer:
    """What every output format implements. The defaults suit a format that writes one file in one go: nothing
    to resume, files hashed after closing."""

    folder: Path
    #: called with (path, sha256) as each file is finished and synced: the staging journal records it for a resume
    on_file_done: Callable[[Path, str], None] | None = None

    def resume(self, done: dict[Path, str]) -> set[int]:
        """Take over the files an interrupted run finished (``done``: path -> SHA256, already checked); return the
        indices of the plan's tensors no longer needed."""
        return set()

    def write(self, block: Block) -> None:
        """Take the next block of the merge (blocks arrive in plan order)."""
        raise NotImplementedError

    def close(self) -> list[Path]:
        """Finish every file (weights, config, tokenizer); return them all."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Format parameters for the recipe (e.g. shard counts)."""
        return {}

    def digests(self) -> dict[Path, str]:
        """SHA256 of the files hashed while they were written; the others are hashed after ``close``."""
        return {}

    def abort(self) -> None:
        """Stop after a failure; the caller removes the folder."""


def check_formats(formats: Sequence[str]) -> list[str]:
    """The requested output formats, deduplicated in order.

    Raises:
        InputError: an unknown format or an empty list.
    """
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InputError(f"unknown format {unknown or formats}; choose from {', '.join(FORMATS)}")
    return formats


def make_writer(fmt: str, folder: Path, plan: MergePlan, *, max_shard_size: int, pth_shards: int | None) -> Writer:
    """The writer of one format (``hf``, ``pth`` or ``gguf``) for ``plan`` into ``folder``."""
    if fmt == "hf":
        from .hf import HFWriter

        return HFWriter(folder, plan, max_shard_size)
    if fmt == "pth":
        from .meta import MetaWriter

        return MetaWriter(folder, plan, pth_shards)
    if fmt == "gguf":
        from .gguf import GGUFOutput

        return GGUFOutput(folder, plan)
    raise ValueError(f"unknown format {fmt!r}")
