"""Output writers. Each is built from a :class:`~hubmerge.plan.MergePlan` (and checks it can represent it before
creating any file), then receives the merge's blocks in order, and on ``close()`` returns the files it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the registry stays importable without torch, so `hubmerge --help` starts fast
    from ...merging import Block
    from ...plan import MergePlan

FORMATS = ("hf", "pth", "gguf")


class Writer(Protocol):
    folder: Path

    def write(self, block: Block) -> None:
        """Take the next block of the merge (blocks arrive in plan order)."""

    def close(self) -> list[Path]:
        """Finish every file (weights, config, tokenizer); return them all."""

    def describe(self) -> dict:
        """Format parameters for the recipe (e.g. shard counts)."""

    def abort(self) -> None:
        """Stop after a failure; the caller removes the folder."""


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
