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


def read_checklist(path: Path) -> dict[str, str]:
    """Parse an ``md5sum``/``sha256sum`` style checklist: ``{file name: hex digest}``.

    Raises:
        InputError: a line that is not ``<hex>  <name>``.
    """
    entries = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"\s*([0-9a-fA-F]{32}|[0-9a-fA-F]{40}|[0-9a-fA-F]{64})\s+\*?(.+?)\s*", line)
        if not m:
            raise InputError(f"{path}:{n}: not a checksum line (expected '<hash>  <file>')")
        entries[m.group(2).removeprefix("./")] = m.group(1).lower()
    return entries


def _algorithm(digest: str) -> str:
    return {32: "md5", 40: "sha1", 64: "sha256"}[len(digest)]


def check_files(folder: Path, expected: dict[str, str], git_blob: Iterable[str] = ()) -> list[CheckRow]:
    """Compare files in ``folder`` with expected hex digests (algorithm from the length; names in ``git_blob`` are
    compared by git blob id instead). Returns one row per expected file, in order. Every file is read: checking
    is meant to see the bytes on disk, so the hash cache is refreshed, not trusted."""
    rows = []
    blob_names = set(git_blob)
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
