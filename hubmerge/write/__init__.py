"""Output writers. Each is built from a :class:`~hubmerge.plan.MergePlan` (and checks it can represent it before
creating any file), then receives the merge's blocks in order, and on ``close()`` returns the files it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..merging import Block

FORMATS = ("hf", "pth")


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
