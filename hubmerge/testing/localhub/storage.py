"""On-disk, git-like storage behind the local Hub server.

Layout under ``root`` (everything is plain JSON or raw bytes, so a test can inspect or corrupt it)::

    auth.json                                   users, orgs and sha256 digests of their tokens
    repos/{type}s/{namespace}/{name}/
        meta.json                               RepoMeta: private, gated, owner, ...
        refs.json                               {"branches": {name: commit}, "tags": {name: commit}}
        commits/{commit id}.json                immutable manifest: path -> FileEntry, parent, message
        objects/{sha256[:2]}/{sha256}           file contents, content-addressed by sha256
        tmp/                                    uploads in progress (same filesystem, so os.replace is atomic)

Only this module touches the disk layout; the HTTP layer talks to :class:`HubStorage`. Everything is standard
library. Big files are streamed in chunks and hashed while they are written; nothing reads a whole object into memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ...directio import DirectAppender

__all__ = [
    "REPO_TYPES",
    "DEFAULT_BRANCH",
    "HubError",
    "RepoNotFound",
    "RevisionNotFound",
    "EntryNotFound",
    "BadRequest",
    "Forbidden",
    "Conflict",
    "FileEntry",
    "Commit",
    "RepoMeta",
    "Refs",
    "AddFile",
    "DeleteFile",
    "DeleteFolder",
    "Principal",
    "AuthDB",
    "HubStorage",
    "git_blob_sha1",
    "lfs_pointer",
    "now_iso",
    "validate_repo_id",
    "validate_file_path",
    "choose_upload_mode",
    "looks_binary",
    "LFS_SUFFIXES",
    "LFS_THRESHOLD",
]

REPO_TYPES: tuple[str, ...] = ("model", "dataset", "space")
DEFAULT_BRANCH = "main"
CHUNK_SIZE = 1 << 20  # 1 MiB: the unit of every streamed copy
COMMIT_ID_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Namespace and repo names as the Hub accepts them; also what keeps URL input from escaping the root directory.
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94})$")
_REF_NAME_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._/-]{0,199}$")
ROLES: tuple[str, ...] = ("read", "write")


# --------------------------------------------------------------------------------------------------------------------
# Errors: each carries the HTTP status and the X-Error-Code the real Hub would send, so the server maps them 1:1.
# --------------------------------------------------------------------------------------------------------------------
class HubError(Exception):
    """An error the server reports to the client: HTTP ``status``, optional ``X-Error-Code`` and a message."""

    status: int = 400
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})  # extra response headers, e.g. X-Repo-Commit
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class RepoNotFound(HubError):
    """The repo does not exist or is hidden from the caller (the server turns this into 401 for anonymous callers)."""

    status = 404
    code = "RepoNotFound"


class RevisionNotFound(HubError):
    """A branch, tag or commit id that does not exist in the repo."""

    status = 404
    code = "RevisionNotFound"


class EntryNotFound(HubError):
    """A file or folder that does not exist at the requested revision."""

    status = 404
    code = "EntryNotFound"


class BadRequest(HubError):
    """Malformed input: invalid names, bad JSON, hash or size mismatches."""

    status = 400


class Forbidden(HubError):
    """Authenticated but not allowed (read-only token, foreign namespace)."""

    status = 403


class Conflict(HubError):
    """Something already exists (repo, tag, branch) or a precondition on the current state failed."""

    status = 409


# --------------------------------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------------------------------
def now_iso(t: float | None = None) -> str:
    """Return ``t`` (default: now) in the Hub's date format, e.g. ``2024-05-01T12:34:56.789Z``."""
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


def git_blob_sha1(data: bytes) -> str:
    """Return the git blob id (sha1 of ``b"blob <size>\\0" + data``) of ``data``."""
    h = hashlib.sha1(b"blob %d\x00" % len(data))
    h.update(data)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Return the git-lfs pointer file git stores in place of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


# Suffixes the Hub's default .gitattributes sends to LFS, plus .gguf (what model repos use in practice).
LFS_SUFFIXES: tuple[str, ...] = (
    ".7z",
    ".arrow",
    ".bin",
    ".bz2",
    ".ckpt",
    ".ftz",
    ".gguf",
    ".gz",
    ".h5",
    ".joblib",
    ".lfs",
    ".mlmodel",
    ".model",
    ".msgpack",
    ".npy",
    ".npz",
    ".onnx",
    ".ot",
    ".parquet",
    ".pb",
    ".pickle",
    ".pkl",
    ".pt",
    ".pth",
    ".rar",
    ".safetensors",
    ".tar",
    ".tflite",
    ".tgz",
    ".wasm",
    ".xz",
    ".zip",
    ".zst",
)
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub refuses regular (non-LFS) files above 10 MiB


def looks_binary(sample: bytes) -> bool:
    """Whether the first bytes of a file look binary: a NUL byte, or invalid UTF-8 before the last 3 bytes."""
    if b"\x00" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(sample) - 3  # a sample may cut a multi-byte character at its end
    return False


def choose_upload_mode(path: str, size: int, sample: bytes) -> str:
    """Return ``"lfs"`` or ``"regular"`` for a file, by the rules of the Hub's preupload endpoint.

    LFS for files above 10 MiB, with an LFS suffix (``.safetensors``, ``.bin``, ``.gguf``...) or a binary sample;
    empty files are always regular (the client refuses to send them as LFS).
    """
    if size == 0:
        return "regular"
    name = path.lower()
    if size > LFS_THRESHOLD or name.endswith(LFS_SUFFIXES) or "tfevents" in name or looks_binary(sample):
        return "lfs"
    return "regular"


def validate_repo_id(repo_id: str) -> tuple[str, str]:
    """Split ``namespace/name`` and check both parts; raise :class:`RepoNotFound` for anything else.

    Not-found rather than bad-request because the ids arrive from URLs, where the real Hub answers 404.
    """
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_NAME_RE.match(p) for p in parts) or ".." in repo_id or parts[1].endswith(".git"):
        raise RepoNotFound(f"Repository {repo_id!r} not found")
    return parts[0], parts[1]


def validate_file_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a repo, else raise :class:`BadRequest`."""
    segments = path.split("/")
    if (
        not path
        or len(path) > 1000
        or any(s in ("", ".", "..") for s in segments)
        or "\\" in path
        or "\x00" in path
        or segments[0] == ".git"
    ):
        raise BadRequest(f"Invalid path in repo: {path!r}")
    return path


def _check_ref_name(name: str) -> str:
    if not _REF_NAME_RE.match(name) or ".." in name or name.endswith("/") or "//" in name:
        raise BadRequest(f"Invalid reference name: {name!r}")
    return name


def _write_json_atomic(path: Path, data: Any) -> None:
    # Readers never see a half-written file: write a sibling temp file, then rename over the target.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    """One file of a commit's manifest.

    ``oid`` is the git blob sha1 of what git stores: the content for regular files, the LFS pointer for LFS files
    (that is what the Hub reports as ``blobId``). ``sha256`` always locates the content in ``objects/``.
    """

    path: str
    size: int
    sha256: str
    oid: str
    lfs: bool

    @property
    def pointer_size(self) -> int:
        """Size in bytes of the LFS pointer file (meaningful for LFS files only)."""
        return len(lfs_pointer(self.sha256, self.size))

    @property
    def etag(self) -> str:
        """The unquoted ETag the Hub sends: sha256 for LFS files, git sha1 for regular files."""
        return self.sha256 if self.lfs else self.oid

    def to_json(self) -> dict[str, Any]:
        """Serialisable form used inside commit manifests (path is the manifest key)."""
        return {"size": self.size, "sha256": self.sha256, "oid": self.oid, "lfs": self.lfs}

    @classmethod
    def from_json(cls, path: str, d: Mapping[str, Any]) -> FileEntry:
        """Inverse of :meth:`to_json`."""
        return cls(path=path, size=int(d["size"]), sha256=d["sha256"], oid=d["oid"], lfs=bool(d["lfs"]))


@dataclass(frozen=True)
class Commit:
    """An immutable commit: full manifest of the tree (not a diff), parent id, message and author."""

    id: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: Mapping[str, FileEntry]

    def to_json(self) -> dict[str, Any]:
        """Serialisable form stored in ``commits/{id}.json``."""
        return {
            "id": self.id,
            "parent": self.parent,
            "title": self.title,
            "message": self.message,
            "author": self.author,
            "date": self.date,
            "files": {p: e.to_json() for p, e in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Commit:
        """Inverse of :meth:`to_json`."""
        return cls(
            id=d["id"],
            parent=d["parent"],
            title=d["title"],
            message=d["message"],
            author=d["author"],
            date=d["date"],
            files={p: FileEntry.from_json(p, e) for p, e in d["files"].items()},
        )


@dataclass
class RepoMeta:
    """Per-repo settings. ``gated`` is ``False``, ``"auto"`` or ``"manual"``; ``gated_allowed`` lists user names."""

    repo_type: str
    repo_id: str
    private: bool = False
    gated: bool | str = False
    gated_allowed: list[str] = field(default_factory=list)
    created_at: str = field(default_factory=now_iso)
    sdk: str | None = None

    @property
    def namespace(self) -> str:
        """The owning user or organisation."""
        return self.repo_id.split("/", 1)[0]

    def to_json(self) -> dict[str, Any]:
        """Serialisable form stored in ``meta.json``."""
        return {
            "repo_type": self.repo_type,
            "repo_id": self.repo_id,
            "private": self.private,
            "gated": self.gated,
            "gated_allowed": sorted(self.gated_allowed),
            "created_at": self.created_at,
            "sdk": self.sdk,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RepoMeta:
        """Inverse of :meth:`to_json`."""
        return cls(
            repo_type=d["repo_type"],
            repo_id=d["repo_id"],
            private=bool(d.get("private", False)),
            gated=d.get("gated", False),
            gated_allowed=list(d.get("gated_allowed", [])),
            created_at=d.get("created_at") or now_iso(),
            sdk=d.get("sdk"),
        )


@dataclass
class Refs:
    """Branches and tags of a repo, each mapping a name to a commit id."""

    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AddFile:
    """Commit operation: put an already stored object (by sha256) at ``path``, as LFS or as a regular file."""

    path: str
    sha256: str
    size: int | None = None  # None: take it from the stored object (server-side copies send no size)
    lfs: bool = False
    git_oid: str | None = None  # git blob sha1 of a regular file when the caller already hashed it


@dataclass(frozen=True)
class DeleteFile:
    """Commit operation: delete the file at ``path`` (it must exist)."""

    path: str


@dataclass(frozen=True)
class DeleteFolder:
    """Commit operation: delete every file under ``path/`` (at least one must exist)."""

    path: str


Operation = AddFile | DeleteFile | DeleteFolder


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: user name, the token's role and the user's organisations."""

    name: str
    role: str
    orgs: tuple[str, ...]

    @property
    def can_write(self) -> bool:
        """Whether the token may create, commit and delete."""
        return self.role == "write"

    def is_member(self, namespace: str) -> bool:
        """Whether ``namespace`` is this user or one of their organisations."""
        return namespace == self.name or namespace in self.orgs


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


# --------------------------------------------------------------------------------------------------------------------
# Users and tokens
# --------------------------------------------------------------------------------------------------------------------
class AuthDB:
    """Users, organisations and access tokens, persisted in ``root/auth.json``.

    Only sha256 digests of tokens are stored, so the file (and any error message) never reveals a token.
    """

    def __init__(self, root: Path) -> None:
        self._path = Path(root) / "auth.json"
        self._lock = threading.RLock()
        self._data: dict[str, Any] = {"users": {}, "orgs": {}, "tokens": {}}
        if self._path.exists():
            self._data = _read_json(self._path)

    @staticmethod
    def _digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def _save(self) -> None:
        _write_json_atomic(self._path, self._data)

    def add_user(self, name: str, *, role: str = "write", orgs: Iterable[str] = (), token: str | None = None) -> str:
        """Create (or extend) user ``name``, add them to ``orgs`` and issue a token; return the token.

        Raises ``ValueError`` for an invalid name or role.
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid user name: {name!r}")
        with self._lock:
            self._data["users"].setdefault(name, {"created_at": now_iso()})
            for org in orgs:
                self.add_org(org, [name])
            tok = self.add_token(name, role=role, token=token)
            self._save()
            return tok

    def add_token(self, user: str, *, role: str = "read", token: str | None = None) -> str:
        """Issue a new token for an existing ``user`` with ``role`` (``read`` or ``write``); return it.

        Raises ``KeyError`` for an unknown user and ``ValueError`` for an unknown role or a malformed token.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if token is not None and (not token or any(c.isspace() for c in token)):
            raise ValueError("a token must be non-empty and contain no whitespace")
        with self._lock:
            if user not in self._data["users"]:
                raise KeyError(f"unknown user: {user!r}")
            # Same shape as real Hub tokens, so client-side token checks behave the same.
            token = token or "hf_" + "".join(
                secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz") for _ in range(34)
            )
            self._data["tokens"][self._digest(token)] = {"user": user, "role": role, "created_at": now_iso()}
            self._save()
            return token

    def add_org(self, org: str, members: Iterable[str] = ()) -> None:
        """Create organisation ``org`` (if needed) and add ``members`` to it. Raises ``ValueError`` on a bad name."""
        if not _NAME_RE.match(org):
            raise ValueError(f"invalid organisation name: {org!r}")
        with self._lock:
            current = self._data["orgs"].setdefault(org, [])
            for m in members:
                if m not in current:
                    current.append(m)
            self._save()

    def authenticate(self, token: str) -> Principal | None:
        """Return the :class:`Principal` owning ``token``, or ``None`` if the token is unknown."""
        with self._lock:
            rec = self._data["tokens"].get(self._digest(token))
            if rec is None or rec["user"] not in self._data["users"]:
                return None
            return Principal(name=rec["user"], role=rec["role"], orgs=self.orgs_of(rec["user"]))

    def orgs_of(self, user: str) -> tuple[str, ...]:
        """Return the sorted organisations ``user`` belongs to."""
        with self._lock:
            return tuple(sorted(o for o, members in self._data["orgs"].items() if user in members))

    def is_org(self, name: str) -> bool:
        """Whether ``name`` is an organisation."""
        with self._lock:
            return name in self._data["orgs"]


# --------------------------------------------------------------------------------------------------------------------
# Repos, commits, refs, objects
# --------------------------------------------------------------------------------------------------------------------
class HubStorage:
    """All repos under ``root``: create/delete repos, store objects, commit, resolve revisions, manage refs.

    Thread-safe within one process (one lock per repo for writes). Commits are immutable files named by their id,
    and a branch moves by an atomic rewrite of ``refs.json``, so a crash never leaves a half-made commit visible.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self.auth = AuthDB(self.root)
        self._locks: dict[tuple[str, str], threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._commit_cache: dict[str, Commit] = {}

    # -- paths and locks ---------------------------------------------------------------------------------------------
    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        """Directory of a repo (whether or not it exists). Raises :class:`RepoNotFound` for invalid ids or types."""
        if repo_type not in REPO_TYPES:
            raise RepoNotFound(f"Unknown repo type {repo_type!r}")
        ns, name = validate_repo_id(repo_id)
        return self.root / "repos" / f"{repo_type}s" / ns / name

    def _lock(self, repo_type: str, repo_id: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault((repo_type, repo_id), threading.RLock())

    def exists(self, repo_type: str, repo_id: str) -> bool:
        """Whether the repo exists."""
        try:
            return (self.repo_dir(repo_type, repo_id) / "meta.json").exists()
        except RepoNotFound:
            return False

    # -- repo lifecycle ----------------------------------------------------------------------------------------------
    def create_repo(self, repo_type: str, repo_id: str, *, private: bool = False, sdk: str | None = None) -> RepoMeta:
        """Create an empty repo (no commit, no branch until the first commit) and return its metadata.

        Raises :class:`Conflict` if it exists, :class:`BadRequest` for an invalid id.
        """
        try:
            d = self.repo_dir(repo_type, repo_id)
        except RepoNotFound as e:
            raise BadRequest(f"Invalid repo name or type: {repo_id!r} ({repo_type})") from e
        with self._lock(repo_type, repo_id):
            if (d / "meta.json").exists():
                raise Conflict(f"You already created this {repo_type} repo: {repo_id}")
            for sub in ("commits", "objects", "tmp"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            _write_json_atomic(d / "refs.json", {"branches": {}, "tags": {}})
            meta = RepoMeta(repo_type=repo_type, repo_id=repo_id, private=private, sdk=sdk)
            _write_json_atomic(d / "meta.json", meta.to_json())  # written last: it marks the repo as existing
            return meta

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        """Delete a repo and all its content. Raises :class:`RepoNotFound` if it does not exist."""
        d = self.repo_dir(repo_type, repo_id)
        with self._lock(repo_type, repo_id):
            if not (d / "meta.json").exists():
                raise RepoNotFound(f"Repository {repo_id!r} not found")
            # Remove the marker first so a concurrent reader sees "not found" rather than a half-deleted repo.
            os.remove(d / "meta.json")
            shutil.rmtree(d, ignore_errors=True)

    def get_meta(self, repo_type: str, repo_id: str) -> RepoMeta:
        """Return the repo's metadata. Raises :class:`RepoNotFound`."""
        path = self.repo_dir(repo_type, repo_id) / "meta.json"
        try:
            return RepoMeta.from_json(_read_json(path))
        except FileNotFoundError:
            raise RepoNotFound(f"Repository {repo_id!r} not found") from None

    def save_meta(self, meta: RepoMeta) -> None:
        """Persist changed metadata of an existing repo. Raises :class:`RepoNotFound`."""
        with self._lock(meta.repo_type, meta.repo_id):
            self.get_meta(meta.repo_type, meta.repo_id)
            _write_json_atomic(self.repo_dir(meta.repo_type, meta.repo_id) / "meta.json", meta.to_json())

    # -- refs and revisions ------------------------------------------------------------------------------------------
    def refs(self, repo_type: str, repo_id: str) -> Refs:
        """Return the repo's branches and tags. Raises :class:`RepoNotFound`."""
        self.get_meta(repo_type, repo_id)
        d = _read_json(self.repo_dir(repo_type, repo_id) / "refs.json")
        return Refs(branches=dict(d["branches"]), tags=dict(d["tags"]))

    def _save_refs(self, repo_type: str, repo_id: str, refs: Refs) -> None:
        _write_json_atomic(
            self.repo_dir(repo_type, repo_id) / "refs.json", {"branches": refs.branches, "tags": refs.tags}
        )

    def resolve(self, repo_type: str, repo_id: str, revision: str | None) -> str | None:
        """Resolve a branch, tag (optionally ``refs/heads/``/``refs/tags/``-prefixed) or full commit id.

        Returns the commit id, or ``None`` for the default branch of a repo that has no commit yet.
        Raises :class:`RevisionNotFound` and :class:`RepoNotFound`.
        """
        revision = revision or DEFAULT_BRANCH
        refs = self.refs(repo_type, repo_id)
        if revision.startswith("refs/heads/") and revision[11:] in refs.branches:
            return refs.branches[revision[11:]]
        if revision.startswith("refs/tags/") and revision[10:] in refs.tags:
            return refs.tags[revision[10:]]
        if revision in refs.branches:
            return refs.branches[revision]
        if revision in refs.tags:
            return refs.tags[revision]
        if COMMIT_ID_RE.match(revision) and self._commit_file(repo_type, repo_id, revision).exists():
            return revision
        if revision == DEFAULT_BRANCH and not refs.branches:
            return None
        raise RevisionNotFound(f"Invalid rev id: {revision}")

    def _commit_file(self, repo_type: str, repo_id: str, commit_id: str) -> Path:
        return self.repo_dir(repo_type, repo_id) / "commits" / f"{commit_id}.json"

    def get_commit(self, repo_type: str, repo_id: str, commit_id: str) -> Commit:
        """Load a commit by id (cached: commits never change). Raises :class:`RevisionNotFound`."""
        key = f"{repo_type}:{repo_id}:{commit_id}"
        cached = self._commit_cache.get(key)
        if cached is not None:
            return cached
        if not COMMIT_ID_RE.match(commit_id):
            raise RevisionNotFound(f"Invalid rev id: {commit_id}")
        try:
            commit = Commit.from_json(_read_json(self._commit_file(repo_type, repo_id, commit_id)))
        except FileNotFoundError:
            raise RevisionNotFound(f"Invalid rev id: {commit_id}") from None
        self._commit_cache[key] = commit
        return commit

    def snapshot(
        self, repo_type: str, repo_id: str, revision: str | None
    ) -> tuple[Commit | None, dict[str, FileEntry]]:
        """Return ``(commit, files)`` at ``revision``; ``(None, {})`` for an empty repo's default branch."""
        cid = self.resolve(repo_type, repo_id, revision)
        if cid is None:
            return None, {}
        commit = self.get_commit(repo_type, repo_id, cid)
        return commit, dict(commit.files)

    def history(self, repo_type: str, repo_id: str, revision: str | None, limit: int = 10_000) -> list[Commit]:
        """Return the commits reachable from ``revision``, newest first (at most ``limit``)."""
        cid = self.resolve(repo_type, repo_id, revision)
        out: list[Commit] = []
        while cid is not None and len(out) < limit:
            c = self.get_commit(repo_type, repo_id, cid)
            out.append(c)
            cid = c.parent
        return out

    def create_tag(self, repo_type: str, repo_id: str, tag: str, revision: str | None) -> str:
        """Tag the commit ``revision`` resolves to; return its id.

        Raises :class:`Conflict` if the tag exists, :class:`RevisionNotFound` if the revision does not.
        """
        _check_ref_name(tag)
        with self._lock(repo_type, repo_id):
            cid = self.resolve(repo_type, repo_id, revision)
            if cid is None:
                raise RevisionNotFound(f"Invalid rev id: {revision} (the repo has no commit yet)")
            refs = self.refs(repo_type, repo_id)
            if tag in refs.tags:
                raise Conflict(f"Tag {tag!r} already exists")
            refs.tags[tag] = cid
            self._save_refs(repo_type, repo_id, refs)
            return cid

    def delete_tag(self, repo_type: str, repo_id: str, tag: str) -> None:
        """Delete a tag. Raises :class:`RevisionNotFound` if it does not exist."""
        with self._lock(repo_type, repo_id):
            refs = self.refs(repo_type, repo_id)
            if refs.tags.pop(tag, None) is None:
                raise RevisionNotFound(f"Invalid rev id: {tag}")
            self._save_refs(repo_type, repo_id, refs)

    def create_branch(self, repo_type: str, repo_id: str, branch: str, starting_point: str | None, author: str) -> str:
        """Create ``branch`` at ``starting_point`` (default: head of ``main``); return its commit id.

        On a repo without any commit an empty initial commit is made on ``main`` first, as the real Hub always
        has one. Raises :class:`Conflict` if the branch exists, :class:`RevisionNotFound` for a bad starting point.
        """
        _check_ref_name(branch)
        with self._lock(repo_type, repo_id):
            refs = self.refs(repo_type, repo_id)
            if branch in refs.branches:
                raise Conflict(f"Branch {branch!r} already exists")
            cid = self.resolve(repo_type, repo_id, starting_point)
            if cid is None:
                cid = self.commit(repo_type, repo_id, DEFAULT_BRANCH, [], title="Initial commit", author=author).id
                refs = self.refs(repo_type, repo_id)
            refs.branches[branch] = cid
            self._save_refs(repo_type, repo_id, refs)
            return cid

    def delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        """Delete a branch other than ``main``. Raises :class:`RevisionNotFound` or :class:`Forbidden`."""
        if branch == DEFAULT_BRANCH:
            raise Forbidden("Cannot delete the default branch")
        with self._lock(repo_type, repo_id):
            refs = self.refs(repo_type, repo_id)
            if refs.branches.pop(branch, None) is None:
                raise RevisionNotFound(f"Invalid rev id: {branch}")
            self._save_refs(repo_type, repo_id, refs)

    # -- objects -----------------------------------------------------------------------------------------------------
    def object_path(self, repo_type: str, repo_id: str, sha256: str) -> Path:
        """Path of the object with content hash ``sha256`` (it may not exist). Raises :class:`BadRequest`."""
        if not SHA256_RE.match(sha256):
            raise BadRequest(f"Invalid sha256 oid: {sha256!r}")
        return self.repo_dir(repo_type, repo_id) / "objects" / sha256[:2] / sha256

    def object_size(self, repo_type: str, repo_id: str, sha256: str) -> int | None:
        """Size of a stored object, or ``None`` if it is not stored."""
        try:
            return self.object_path(repo_type, repo_id, sha256).stat().st_size
        except FileNotFoundError:
            return None

    def store_stream(
        self,
        repo_type: str,
        repo_id: str,
        stream: _Readable,
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> tuple[str, int]:
        """Copy ``stream`` (read until EOF) into the object store while hashing it; return ``(sha256, size)``.

        With ``expected_sha256``/``expected_size`` the object is only kept if both match; otherwise the temp file is
        dropped and :class:`BadRequest` raised. Stops reading as soon as the stream exceeds ``expected_size``.
        """
        tmp_dir = self.repo_dir(repo_type, repo_id) / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"upload-{secrets.token_hex(8)}"
        h = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as f:
                # Straight to the disk (O_DIRECT): this server stands in for the Hub's machines, and filling the
                # page cache with what it receives would take CPU from the client it is measured against.
                out = DirectAppender(f.fileno())
                try:
                    while True:
                        chunk = stream.read(CHUNK_SIZE)
                        if not chunk:
                            break
                        size += len(chunk)
                        if expected_size is not None and size > expected_size:
                            raise BadRequest(f"Upload is larger than the announced size {expected_size}")
                        h.update(chunk)
                        out.append(memoryview(chunk))
                    out.flush(size)
                finally:
                    with contextlib.suppress(OSError):  # no write may outlive the file (flush raised its error)
                        out.close()
            sha = h.hexdigest()
            if expected_size is not None and size != expected_size:
                raise BadRequest(f"Size mismatch: expected {expected_size} bytes, received {size}")
            if expected_sha256 is not None and sha != expected_sha256:
                raise BadRequest(f"sha256 mismatch: expected {expected_sha256}, received content hashes to {sha}")
            final = self.object_path(repo_type, repo_id, sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)  # same content, same name: a concurrent identical upload is harmless
            return sha, size
        finally:
            tmp.unlink(missing_ok=True)

    def store_bytes(self, repo_type: str, repo_id: str, data: bytes) -> str:
        """Store small in-memory content (a regular file from a commit); return its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        final = self.object_path(repo_type, repo_id, sha)
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.repo_dir(repo_type, repo_id) / "tmp" / f"bytes-{secrets.token_hex(8)}"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, final)
        return sha

    def iter_object(
        self, repo_type: str, repo_id: str, sha256: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """Yield the bytes ``[start, end)`` of an object in chunks. Raises :class:`EntryNotFound` if it is missing."""
        try:
            f = open(self.object_path(repo_type, repo_id, sha256), "rb")
        except FileNotFoundError:
            raise EntryNotFound("The stored object for this file is missing") from None
        with f:
            f.seek(start)
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                chunk = f.read(CHUNK_SIZE if remaining is None else min(CHUNK_SIZE, remaining))
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def _git_sha1_of_object(self, repo_type: str, repo_id: str, sha256: str, size: int) -> str:
        h = hashlib.sha1(b"blob %d\x00" % size)
        for chunk in self.iter_object(repo_type, repo_id, sha256):
            h.update(chunk)
        return h.hexdigest()

    # -- commits -----------------------------------------------------------------------------------------------------
    def commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        operations: Iterable[Operation],
        *,
        title: str,
        message: str = "",
        author: str,
        parent_commit: str | None = None,
    ) -> Commit:
        """Apply ``operations`` to the head of ``branch`` and move the branch to the new commit; return it.

        ``branch`` must be a branch (``main`` may be absent on an empty repo). ``parent_commit``, if given, must be
        the current head (optimistic concurrency, as on the Hub). Every added object must already be stored.
        Raises :class:`RevisionNotFound`, :class:`EntryNotFound` (deleting what is absent), :class:`BadRequest`
        (invalid path, missing object, size mismatch) and :class:`Conflict` (stale ``parent_commit``).
        """
        with self._lock(repo_type, repo_id):
            refs = self.refs(repo_type, repo_id)
            if branch.startswith("refs/heads/"):
                branch = branch[len("refs/heads/") :]
            if branch in refs.branches:
                head: str | None = refs.branches[branch]
            elif branch == DEFAULT_BRANCH and not refs.branches:
                head = None
            elif branch in refs.tags or COMMIT_ID_RE.match(branch):
                raise BadRequest(f"Can only commit to a branch, {branch!r} is not one")
            else:
                raise RevisionNotFound(f"Invalid rev id: {branch}")
            if parent_commit is not None and parent_commit != head:
                raise Conflict(f"A commit has happened since {parent_commit}: head of {branch!r} is {head}", status=412)
            files: dict[str, FileEntry] = dict(self.get_commit(repo_type, repo_id, head).files) if head else {}
            for op in operations:
                self._apply(repo_type, repo_id, files, op)
            date = now_iso()
            body = json.dumps(
                {
                    "parent": head,
                    "files": {p: e.to_json() for p, e in sorted(files.items())},
                    "title": title,
                    "message": message,
                    "author": author,
                    "date": date,
                    "nonce": secrets.token_hex(8),  # two identical commits in the same millisecond still differ
                },
                sort_keys=True,
            ).encode()
            commit = Commit(
                id=hashlib.sha1(body).hexdigest(),
                parent=head,
                title=title,
                message=message,
                author=author,
                date=date,
                files=files,
            )
            _write_json_atomic(self._commit_file(repo_type, repo_id, commit.id), commit.to_json())
            refs.branches[branch] = commit.id  # the atomic refs rewrite is what publishes the commit
            self._save_refs(repo_type, repo_id, refs)
            return commit

    def _apply(self, repo_type: str, repo_id: str, files: dict[str, FileEntry], op: Operation) -> None:
        if isinstance(op, AddFile):
            path = validate_file_path(op.path)
            stored = self.object_size(repo_type, repo_id, op.sha256)
            if stored is None:
                raise BadRequest(f"{path}: object sha256:{op.sha256} was never uploaded")
            if op.size is not None and op.size != stored:
                raise BadRequest(f"{path}: announced size {op.size} does not match the uploaded object ({stored})")
            # A path can't be both a file and a folder in git.
            if any(p.startswith(path + "/") for p in files):
                raise BadRequest(f"{path}: a folder with this name exists")
            parts = path.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in files:
                    raise BadRequest(f"{path}: {'/'.join(parts[:i])} is a file")
            prev = files.get(path)
            if op.lfs:
                oid = git_blob_sha1(lfs_pointer(op.sha256, stored))
            elif op.git_oid is not None:
                oid = op.git_oid
            elif prev is not None and not prev.lfs and prev.sha256 == op.sha256:
                oid = prev.oid
            else:
                oid = self._git_sha1_of_object(repo_type, repo_id, op.sha256, stored)
            files[path] = FileEntry(path=path, size=stored, sha256=op.sha256, oid=oid, lfs=op.lfs)
        elif isinstance(op, DeleteFile):
            if files.pop(op.path, None) is None:
                raise EntryNotFound(f"A file with this name doesn't exist: {op.path}")
        elif isinstance(op, DeleteFolder):
            prefix = op.path.rstrip("/") + "/"
            doomed = [p for p in files if p.startswith(prefix)]
            if not doomed:
                raise EntryNotFound(f"A folder with this name doesn't exist: {op.path}")
            for p in doomed:
                del files[p]
        else:  # pragma: no cover - the server only builds the three kinds above
            raise BadRequest(f"Unknown operation {op!r}")
