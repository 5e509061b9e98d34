"""Output writers. Each is built from a :class:`~hubmerge.plan.MergePlan` (and checks it can represent it before
creating any file), then receives the merge's blocks in order, and on ``close()`` returns the files it wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import InputError

if TYPE_CHECKING:  # the registry stays importable without torch, so `hubmerge --help` starts fast
    from ...merging import Block
    from ...plan import MergePlan

FORMATS = ("hf", "pth", "gguf")
# GGUF tensor types, spelled as llama.cpp's --outtype spells them: "gguf:<type>". Plain "gguf" follows --dtype.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


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


def check_formats(formats: str | Iterable[str]) -> list[str]:
    """The requested output formats, from ``--format`` text (``"hf,gguf:q8_0"``) or a list, deduplicated in order:
    each one of ``hf``, ``pth``, ``gguf`` or ``gguf:<type>`` with a type of :data:`GGUF_TYPES`.

    Raises:
        InputError: an unknown format or type, or none at all (one line, naming the choices).
    """
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    found = list(dict.fromkeys(f.strip().lower() for f in items if f.strip()))
    bad = [f for f in found if f not in FORMATS and not (f.startswith("gguf:") and f[5:] in GGUF_TYPES)]
    if bad or not found:
        raise InputError(
            f"unknown format {', '.join(bad) or repr(formats)}; choose from {', '.join(FORMATS)} or "
            f"gguf:<type> with a type of {', '.join(GGUF_TYPES)} (as llama.cpp's --outtype)"
        )
    return found


def format_folder(fmt: str) -> str:
    """The folder a format writes into when several are written: ``hf``, ``pth`` or ``gguf`` (every GGUF type)."""
    return fmt.partition(":")[0]


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
