"""One exception hierarchy. Every message is a single line that names the file or input at fault and the fix.

The CLI prints ``error: <message>`` for these and exits non-zero; anything else is a bug and shows a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

#: What the user can do about an error, for front ends that word the fix their own way (the Space points at its
#: controls instead of CLI flags): replace the existing output or repo, sign in (again), or pick other options.
Remedy = Literal["overwrite", "login", "dtype", "format", "no-verify"]

__all__ = [
    "HubmergeError",
    "InputError",
    "CorruptFileError",
    "UnsafeFileError",
    "IncompatibleError",
    "HubAccessError",
    "VerificationError",
    "OutputError",
    "Interrupted",
]


class HubmergeError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the one-line message to show.

    Attributes:
        path: the local file or folder at fault, when there is one.
        repo_id: the Hub repo at fault, when there is one.
        remedy: what fixes it, as a keyword (:data:`Remedy`), when the message names a CLI option for it.
    """

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        repo_id: str | None = None,
        remedy: Remedy | None = None,
    ) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.repo_id = repo_id
        self.remedy = remedy


class InputError(HubmergeError):
    """An input folder or file is missing, unsupported or malformed (config, adapter, tokenizer)."""


class CorruptFileError(InputError):
    """A weight file is truncated or damaged (bad header, offsets past the end, broken zip)."""


class UnsafeFileError(InputError):
    """A file asks for something hubmerge refuses to do, e.g. a pickle that references code, a path escaping a folder."""


class IncompatibleError(HubmergeError):
    """Inputs are individually fine but do not fit together (shapes, vocabularies, adapter order)."""


class HubAccessError(HubmergeError):
    """The Hub refused or could not serve a request (authentication, access, missing repo or revision)."""


class VerificationError(HubmergeError):
    """A file's hash differs from the recorded or known one."""


class OutputError(HubmergeError):
    """The output cannot be written where asked (exists, inside an input), or the machine lacks room for it
    (disk, memory)."""


class Interrupted(HubmergeError):
    """The user stopped the run (Ctrl-C); finished files are kept so that the same command resumes."""

    exit_code = 130
