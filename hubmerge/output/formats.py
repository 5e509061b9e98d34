"""The output formats a user can ask for, and how ``--format`` is spelled. Importable without torch, so the CLI
checks its arguments (and ``hubmerge --help`` starts) before anything heavy is imported."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import InputError

FORMATS = ("hf", "pth", "gguf")
# GGUF tensor types, spelled as llama.cpp's --outtype spells them: "gguf:<type>". Plain "gguf" follows --dtype.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


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
