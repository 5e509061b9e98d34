"""Output writers. Each is built from a :class:`~hubmerge.plan.MergePlan` (and checks it can represent it before
creating any file), then receives the merge's blocks in order, and on ``close()`` returns the files it wrote.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ...errors import InputError

if TYPE_CHECKING:  # the registry stays importable without torch, so `hubmerge --help` starts fast
    from ...merging import Block
    from ...plan import MergePlan

FORMATS = ("hf", "pth", "gguf")
# GGUF tensor types, spelled as llama.cpp's --outtype spells them: "gguf:<type>". Plain "gguf" follows --dtype.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def parse_formats(value: str | Iterable[str]) -> list[str]:
    """The output formats of ``--format`` text (``"hf,gguf:q8_0"``) or a list, deduplicated in order: each one of
    ``hf``, ``pth``, ``gguf`` or ``gguf:<type>`` with a type of :data:`GGUF_TYPES`.

    Raises:
        InputError: an unknown format or type, or none at all (one line, naming the choices).
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    formats = list(dict.fromkeys(f.strip().lower() for f in items if f.strip()))
    bad = [f for f in formats if f not in FORMATS and not (f.startswith("gguf:") and f[5:] in GGUF_TYPES)]
    if bad or not formats:
        raise InputError(
            f"unknown format {', '.join(bad) or repr(value)}; choose from {', '.join(FORMATS)} or "
            f"gguf:<type> with a type of {', '.join(GGUF_TYPES)} (as llama.cpp's --outtype)"
        )
    return formats


def format_folder(fmt: str) -> str:
    """The folder a format writes into when several are written: ``hf``, ``pth`` or ``gguf`` (every GGUF type)."""
    return fmt.partition(":")[0]


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
    """The writer of one format (``hf``, ``pth``, ``gguf`` or ``gguf:<type>``) for ``plan`` into ``folder``."""
    if fmt == "hf":
        from .hf import HFWriter

        return HFWriter(folder, plan, max_shard_size)
    if fmt == "pth":
        from .meta import MetaWriter

        return MetaWriter(folder, plan, pth_shards)
    if format_folder(fmt) == "gguf":
        from .gguf import GGUFOutput

        return GGUFOutput(folder, plan, fmt.partition(":")[2] or None)
    raise ValueError(f"unknown format {fmt!r}")
