"""Checklists (``md5sum``/``sha256sum`` files such as Meta's ``checklist.chk``, or a recipe's file table) and the
verification table they produce."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .hashing import file_digest, git_blob_sha1
from .known import known_name


@dataclass
class CheckRow:
    """One line of a verification table."""

    file: str
    expected: str | None
    actual: str | None
    status: str  # "ok", "MISMATCH", "missing", "unverified"
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "unverified")


_DIGEST = re.compile(r"[0-9a-fA-F]{32}|[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")
_MAX_CHECKLIST = 1024 * 1024  # Meta's lists are a few hundred bytes; sha256sum lists of thousands of files fit


def inside_name(name: str, *, plain: bool = False) -> bool:
    """Whether ``name`` is a relative path that stays inside its folder: not absolute, no empty, ``.`` or ``..``
    component, no backslash or NUL; with ``plain``, a bare file name (no folder at all)."""
    parts = name.split("/")
    return (
        bool(name)
        and "\\" not in name
        and "\0" not in name
        and all(p not in ("", ".", "..") for p in parts)
        and (len(parts) == 1 or not plain)
    )


def read_checklist(path: Path, *, plain: bool = False) -> dict[str, str]:
    """Parse an ``md5sum``/``sha256sum`` style checklist: ``{file name: hex digest}``.

    Args:
        plain: every entry must be a bare file name (Meta's checklist.chk lists the files next to it).
    Raises:
        InputError: an unreadable or oversized file, a line that is not ``<hex>  <name>``, or a name that leaves the
        checklist's folder (absolute, ``..``; with ``plain`` any ``/``): nothing outside is ever hashed or reported.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_CHECKLIST + 1)
        text = raw.decode("utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror}); check the file exists and is readable") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text checklist (not UTF-8); restore the original file") from None
    if len(raw) > _MAX_CHECKLIST:
        raise InputError(
            f"{path}: larger than {_MAX_CHECKLIST // 1024} KiB, not a checklist; restore the original file"
        )
    entries = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(rf"\s*({_DIGEST.pattern})\s+\*?(.+?)\s*", line)
        if not m:
            raise InputError(f"{path}:{n}: not a checksum line (expected '<hash>  <file>')")
        name = m.group(2).removeprefix("./")
        if not inside_name(name, plain=plain):
            where = "a plain file name next to it" if plain else "a path inside the folder checked"
            raise InputError(
                f"{path}:{n}: {name[:100]!r} is not {where}; hubmerge never checks files elsewhere: "
                "restore the original checklist"
            )
        entries[name] = m.group(1).lower()
    return entries


def _algorithm(digest: str) -> str:
    return {32: "md5", 40: "sha1", 64: "sha256"}[len(digest)]


def check_files(folder: Path, expected: dict[str, str], git_blob: Iterable[str] = ()) -> list[CheckRow]:
    """Compare files in ``folder`` with expected hex digests (algorithm from the length; names in ``git_blob`` are
    compared by git blob id instead). Returns one row per expected file, in order. Every file is read: checking
    is meant to see the bytes on disk, so the hash cache is refreshed, not trusted.

    Raises:
        InputError: a name that leaves ``folder`` (nothing is hashed then).
    """
    rows = []
    blob_names = set(git_blob)
    outside = next((n for n in expected if not inside_name(n)), None)
    if outside is not None:
        raise InputError(
            f"{folder}: the list to verify names {outside[:100]!r}, outside the folder; refusing to check it"
        )
    odd = next((n for n, d in expected.items() if d and not _DIGEST.fullmatch(d)), None)
    if odd is not None:
        raise InputError(
            f"{folder}: the list to verify gives {odd[:100]!r} a digest that is no md5, sha1 or sha256 "
            f"({expected[odd][:70]!r}); restore the original list"
        )
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            rows.append(CheckRow(name, want, None, "missing"))
            continue
        if not want:
            rows.append(CheckRow(name, None, file_digest(path, fresh=True), "unverified", "no recorded hash"))
            continue
        got = git_blob_sha1(path) if name in blob_names else file_digest(path, _algorithm(want), fresh=True)
        known = known_name(got) if len(got) == 64 else None
        rows.append(CheckRow(name, want, got, "ok" if got == want.lower() else "MISMATCH", known or ""))
    return rows


def format_table(rows: list[CheckRow]) -> list[str]:
    """Rows as aligned text lines: file, status, expected and actual digests (shortened), note."""
    width = max([len(r.file) for r in rows] + [4])
    lines = [f"{'file':<{width}}  {'status':<10}  {'expected':<16}  {'actual':<16}  note"]
    for r in rows:
        lines.append(
            f"{r.file:<{width}}  {r.status:<10}  {(r.expected or '-')[:16]:<16}  {(r.actual or '-')[:16]:<16}"
            f"  {r.note}".rstrip()
        )
    return lines
