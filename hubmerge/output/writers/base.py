"""The contract every output format implements."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...merging import Block


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
