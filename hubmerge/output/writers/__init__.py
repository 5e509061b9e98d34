"""Output writers. Each is built from a :class:`~hubmerge.plan.MergePlan` (and checks it can represent it before
creating any file), then receives the merge's blocks in order, and on ``close()`` returns the files it wrote.
"""

from __future__ import annotations

from pathlib import Path

from ...plan import MergePlan
from ...tensorio.output import HeldFiles
from ..formats import format_folder
from .base import Writer
from .gguf import GGUFOutput
from .hf import HFWriter
from .meta import MetaWriter

__all__ = ["Writer", "make_writer", "HFWriter", "MetaWriter", "GGUFOutput"]


def make_writer(
    fmt: str,
    folder: Path,
    plan: MergePlan,
    *,
    max_shard_size: int,
    pth_shards: int | None,
    held: HeldFiles | None = None,
) -> Writer:
    """The writer of one format (``hf``, ``pth``, ``gguf`` or ``gguf:<type>``) for ``plan`` into ``folder``;
    ``held``: the HF shards are held in memory there instead of written to disk."""
    if fmt == "hf":
        return HFWriter(folder, plan, max_shard_size, held=held)
    if fmt == "pth":
        return MetaWriter(folder, plan, pth_shards)
    if format_folder(fmt) == "gguf":
        return GGUFOutput(folder, plan, fmt.partition(":")[2] or None)
    raise ValueError(f"unknown format {fmt!r}")
