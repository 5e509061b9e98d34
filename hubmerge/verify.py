"""Verify files before they are used: against the Hub's record (SHA256 of LFS files, git blob id of small files),
against the built-in table of known published files (``data/known_hashes.json``), against a ``hubmerge.json``
recipe, or against an ``md5sum``/``sha256sum`` checklist (Meta's ``checklist.chk``)."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import IncompatibleError, InputError, VerificationError

_CHUNK = 8 * 1024 * 1024


def _read_into(path: Path, hashers: Iterable[Any], progress: Callable[[int], object] | None = None) -> None:
    """Feed a file to every hasher in one pass of 8 MB reads, reporting bytes read to ``progress``."""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashers:
                h.update(chunk)
            if progress is not None:
                progress(len(chunk))


# SHA256 started early by prehash(), keyed by file identity so a file changed since is hashed afresh.
_EARLY: dict[tuple[str, int, int], Future] = {}
_EARLY_POOL: ThreadPoolExecutor | None = None
PREHASH_SUFFIXES = (".safetensors", ".bin", ".pth")


def _identity(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def prehash(folders: Iterable[str | Path]) -> None:
    """Start hashing (SHA256, one background thread) the weight files of whichever of ``folders`` exist locally.

    The CLI calls this before importing torch: the import keeps one core busy for seconds, during which the other
    reads and hashes the inputs the recipe must record (and leaves them in the page cache for the merge).
    """
    global _EARLY_POOL
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix in PREHASH_SUFFIXES and path.is_file():
                if _EARLY_POOL is None:
                    _EARLY_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubmerge-prehash")
                _EARLY.setdefault(_identity(path), _EARLY_POOL.submit(file_digests, path, ("sha256",)))


def file_digest(path: Path, algorithm: str = "sha256", progress: Callable[[int], object] | None = None) -> str:
    """Hex digest of a file (``sha256``, ``md5``, ...); ``progress`` is called with the bytes read so far."""
    if algorithm == "sha256" and progress is None and _EARLY:
        early = _EARLY.get(_identity(path))
        if early is not None:
            return early.result()["sha256"]
    return file_digests(path, (algorithm,), progress)[algorithm]


def file_digests(path: Path, algorithms: Iterable[str],
                 progress: Callable[[int], object] | None = None) -> dict[str, str]:
    """Several hex digests of a file from a single read (e.g. a checklist's md5 and the known-table's sha256)."""
    hashes = {a: hashlib.new(a) for a in algorithms}
    _read_into(path, hashes.values(), progress)
    return {a: h.hexdigest() for a, h in hashes.items()}


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file (what the Hub records for files not stored in LFS)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    _read_into(path, (h,))
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
        same_type = [t for t in known_hashes()["tokenizers"] if t["type"] == wanted]
        expected = next((t for t in same_type if t["vocab_size"] == vocab_rows), same_type[0])["name"]
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
        if not want:
            rows.append(CheckRow(name, None, file_digest(path), "unverified", "no recorded hash"))
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


def _cache_expectations(folder: Path) -> tuple[dict[str, str], set[str]] | None:
    """For a snapshot folder of the HF cache: each file's expected digest is the name of the blob it links to
    (SHA256 for LFS files, git blob id otherwise). None when ``folder`` is not such a snapshot."""
    if folder.parent.name != "snapshots" or not folder.parent.parent.name.startswith(("models--", "datasets--")):
        return None
    expected, blobs = {}, set()
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or path.is_file():
            etag = path.resolve().name
            name = path.relative_to(folder).as_posix()
            expected[name] = etag
            if len(etag) == 40:
                blobs.add(name)
    return expected, blobs


def verify_target(target: str, *, checklist: str | Path | None = None, hub=None) -> list[CheckRow]:
    """Verify a local folder, an HF cache snapshot or a Hub repo (``org/name[@revision]``).

    A folder is checked against ``checklist`` when given, else its ``hubmerge.json``, else (a cache snapshot) the
    blob names the cache stores, else Meta's ``checklist.chk``. A Hub repo is downloaded into the cache and every
    file is checked against the Hub's record.

    Returns:
        one :class:`CheckRow` per file.
    Raises:
        InputError: nothing to verify against. HubAccessError: the Hub refused.
    """
    from .recipe import RECIPE_NAME

    folder = Path(target).expanduser()
    if checklist is not None:
        return check_files(folder, read_checklist(Path(checklist)))
    if folder.is_dir():
        if (folder / RECIPE_NAME).is_file():
            try:
                files = json.loads((folder / RECIPE_NAME).read_text(encoding="utf-8"))["files"]
            except (ValueError, KeyError):
                raise InputError(f"{folder / RECIPE_NAME}: not a hubmerge recipe; restore it or use --checklist") from None
            return check_files(folder, files)
        cached = _cache_expectations(folder)
        if cached is not None:
            return check_files(folder, cached[0], git_blob=cached[1])
        if (folder / "checklist.chk").is_file():
            return check_files(folder, read_checklist(folder / "checklist.chk"))
        raise InputError(f"{folder}: nothing to verify against (no hubmerge.json, checklist.chk or cache "
                         "snapshot); give --checklist FILE")
    return _verify_repo(target, hub)


def _verify_repo(target: str, hub) -> list[CheckRow]:
    from huggingface_hub import hf_hub_download

    from .hub import Hub, hub_errors
    from .sources import resolve

    hub = hub or Hub()
    source = resolve(target, "base", hub)
    rows = []
    for name, record in sorted(source.remote.items()):
        with hub_errors(hub, source.repo_id or target, revision=source.revision, filename=name):
            local = Path(hf_hub_download(source.repo_id, name, revision=source.commit, cache_dir=hub.cache_dir,
                                         token=hub.token, endpoint=hub.url))
        rows += check_files(local.parent, {local.name: record.sha256 or record.blob_id or ""},
                            git_blob=() if record.sha256 else (local.name,))
        rows[-1].file = name
    return rows
