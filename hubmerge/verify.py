"""Verify files before they are used: against the Hub's record (SHA256 of LFS files, git blob id of small files),
against the built-in table of known published files (``data/known_hashes.json``), against a ``hubmerge.json``
recipe, or against an ``md5sum``/``sha256sum`` checklist (Meta's ``checklist.chk``)."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from .errors import IncompatibleError, InputError, VerificationError

_CHUNK = 8 * 1024 * 1024


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file (``sha256``, ``md5``, ...), read in 8 MB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file (what the Hub records for files not stored in LFS)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@functools.cache
def known_hashes() -> dict[str, Any]:
    """The built-in table of known published files (tokenizers, adapters, original and merged checkpoints)."""
    return json.loads(resources.files("hubmerge").joinpath("data/known_hashes.json").read_text(encoding="utf-8"))


def known_name(sha256: str) -> str | None:
    """Display name of a known file with this SHA256, if any."""
    for group in ("tokenizers", "adapters", "originals", "merged"):
        for entry in known_hashes()[group]:
            if entry["sha256"] == sha256:
                return entry["name"]
    return None


def check_known_file(repo_id: str | None, filename: str, sha256: str) -> None:
    """Raise when ``filename`` of a known published repo has a different SHA256 than the one published.

    Raises:
        VerificationError: naming the file, both hashes and the fix.
    """
    if repo_id is None:
        return
    for entry in known_hashes()["adapters"]:
        if repo_id.lower() in entry["repos"] and entry["file"] == filename and entry["sha256"] != sha256:
            raise VerificationError(
                f"{repo_id}/{filename}: SHA256 {sha256[:16]}... differs from the published {entry['name']} file "
                f"({entry['sha256'][:16]}...); the file is corrupt or altered: delete it from the cache and download "
                "it again")


def tokenizer_type(sha256: str | None) -> dict[str, Any] | None:
    """The known-tokenizer entry (name, type, vocab_size) for a tokenizer.model SHA256, if known."""
    return next((t for t in known_hashes()["tokenizers"] if t["sha256"] == sha256), None)


def check_tokenizer_matches(adapter_label: str, repo_id: str | None, tokenizer_sha: str | None,
                            vocab_rows: int | None) -> None:
    """Catch, by hash, a known tokenizer.model of the wrong family shipped with an adapter (the classic mix-up of
    the LLaMA-type and Alpaca-type tokenizers), before any shape error could hide it.

    The adapter's family is known from the table (by repo) or from its embedding rows (49953 vs 49954).

    Raises:
        IncompatibleError: naming both families and the fix.
    """
    found = tokenizer_type(tokenizer_sha)
    if found is None:
        return
    wanted = next((e["tokenizer"] for e in known_hashes()["adapters"] if repo_id and repo_id.lower() in e["repos"]),
                  None)
    if wanted is None and vocab_rows is not None:
        wanted = next((t["type"] for t in known_hashes()["tokenizers"] if t["vocab_size"] == vocab_rows), None)
    if wanted is not None and wanted != found["type"]:
        expected = next(t["name"] for t in known_hashes()["tokenizers"] if t["type"] == wanted)
        raise IncompatibleError(
            f"adapter {adapter_label}: its tokenizer.model is the {found['name']} ({found['vocab_size']} tokens) but "
            f"the adapter needs the {expected}; use the tokenizer.model published with this adapter")


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
    compared by git blob id instead). Returns one row per expected file, in order."""
    rows = []
    blob_names = set(git_blob)
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            rows.append(CheckRow(name, want, None, "missing"))
            continue
        got = git_blob_sha1(path) if name in blob_names else file_digest(path, _algorithm(want))
        known = known_name(got) if len(got) == 64 else None
        rows.append(CheckRow(name, want, got, "ok" if got == want.lower() else "MISMATCH", known or ""))
    return rows


def format_table(rows: list[CheckRow]) -> list[str]:
    """Rows as aligned text lines: file, status, expected and actual digests (shortened), note."""
    width = max([len(r.file) for r in rows] + [4])
    lines = [f"{'file':<{width}}  {'status':<10}  {'expected':<16}  {'actual':<16}  note"]
    for r in rows:
        lines.append(f"{r.file:<{width}}  {r.status:<10}  {(r.expected or '-')[:16]:<16}  {(r.actual or '-')[:16]:<16}"
                     f"  {r.note}".rstrip())
    return lines
