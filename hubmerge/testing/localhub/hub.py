"""The in-process API of the local Hub: :class:`LocalHub` starts the server in a thread and seeds its data."""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from .faults import FaultInjector
from .server import ADMIN_HEADER, URL_PREFIX, HubHTTPServer, RequestRecord, State
from .storage import (
    DEFAULT_BRANCH,
    AddFile,
    DeleteFile,
    DeleteFolder,
    EntryNotFound,
    FileEntry,
    HubStorage,
    choose_upload_mode,
)

__all__ = ["LocalHub"]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # IPv6 literals need brackets in URLs


class LocalHub:
    """A Hub-compatible HTTP server on ``host:port`` (default ``127.0.0.1``, a free port) storing data under ``root``.

    Use as a context manager (``with LocalHub(root) as hub: ...``) or call :meth:`start`/:meth:`stop`. State lives on
    disk, so a new ``LocalHub`` on the same ``root`` serves the same users, repos and files. Faults for tests are set
    through :attr:`faults` (a :class:`~hubmerge.testing.localhub.faults.FaultInjector`). ``bandwidth`` (bytes/s)
    throttles it like a network link: that rate in each direction, shared by all transfers at once.

    The HTTP control endpoints (``/_localhub/users``, ``/_localhub/faults``) answer only requests carrying
    :attr:`admin_headers`: a secret made for each server, so that no other local process can mint a token or inject a
    fault.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
        tree_page_size: int = 1000,
        bandwidth: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.storage = HubStorage(self.root)
        self.faults = FaultInjector()
        self.admin_secret = secrets.token_urlsafe(32)
        self._host, self._port = host, port
        self._state = State(
            self.storage,
            self.faults,
            verbose=verbose,
            tree_page_size=max(1, tree_page_size),
            admin_secret=self.admin_secret,
            bandwidth=bandwidth,
        )
        self._server: HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def start(self) -> LocalHub:
        """Bind and serve in a daemon thread; return ``self``. Raises ``RuntimeError`` if already started, ``OSError``
        if the address is taken."""
        if self._server is not None:
            raise RuntimeError("LocalHub already started")
        self._server = HubHTTPServer((self._host, self._port), self._state)
        self._state.hostport = f"{_url_host(self._host)}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="localhub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections and release the port. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_all_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound TCP port. Raises ``RuntimeError`` before :meth:`start`."""
        if self._server is None:
            raise RuntimeError("LocalHub is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The endpoint to give the client, e.g. ``http://127.0.0.1:54321``. Raises ``RuntimeError`` if not running."""
        return f"http://{_url_host(self._host)}:{self.port}"

    @property
    def admin_headers(self) -> dict[str, str]:
        """The header that authorises a request to the ``/_localhub`` control endpoints."""
        return {ADMIN_HEADER: self.admin_secret}

    @property
    def requests(self) -> list[RequestRecord]:
        """Requests served so far (bounded to the last 10 000), oldest first; secrets in URLs are masked."""
        return list(self._state.requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        self._state.requests.clear()

    # -- accounts -----------------------------------------------------------------------------------------------------
    def add_user(self, name: str, *, role: str = "write", orgs: Iterable[str] = (), token: str | None = None) -> str:
        """Create user ``name`` (member of ``orgs``) and return a fresh token with ``role`` (``write`` or ``read``).

        Pass ``token`` to choose its value. Raises ``ValueError`` for a bad name, role or token.
        """
        return self.storage.auth.add_user(name, role=role, orgs=orgs, token=token)

    def add_token(self, user: str, role: str = "read") -> str:
        """Return a new token for an existing ``user`` with ``role``. Raises ``KeyError`` for an unknown user."""
        return self.storage.auth.add_token(user, role=role)

    def add_org(self, org: str, members: Iterable[str] = ()) -> None:
        """Create organisation ``org`` and add ``members`` (user names) to it."""
        self.storage.auth.add_org(org, members)

    # -- repos (direct, no HTTP: for seeding fixtures quickly) ---------------------------------------------------------
    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, sdk: str | None = None
    ) -> str:
        """Create an empty repo (no commit yet) owned by its namespace; return its URL (just the path if the server
        is not running). Raises ``Conflict`` (409) if it exists, ``BadRequest`` for an invalid id or type."""
        self.storage.create_repo(repo_type, repo_id, private=private, sdk=sdk)
        return f"{self.url if self._server else ''}/{URL_PREFIX[repo_type]}{repo_id}"

    def set_private(self, repo_id: str, private: bool = True, *, repo_type: str = "model") -> None:
        """Make a repo private or public. Raises ``RepoNotFound``."""
        meta = self.storage.get_meta(repo_type, repo_id)
        meta.private = private
        self.storage.save_meta(meta)

    def set_gated(
        self, repo_id: str, allowed: Iterable[str] = (), *, mode: str | bool = "manual", repo_type: str = "model"
    ) -> None:
        """Gate a repo: only its namespace members and the ``allowed`` users may download files (others get
        ``GatedRepoError``), everyone may still read its info. ``mode=False`` removes the gate.

        Raises ``RepoNotFound``.
        """
        if mode not in ("manual", "auto", False):
            raise ValueError("mode must be 'manual', 'auto' or False")
        meta = self.storage.get_meta(repo_type, repo_id)
        meta.gated = mode
        meta.gated_allowed = sorted(set(allowed))
        self.storage.save_meta(meta)

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike[str]],
        *,
        message: str = "Add files",
        revision: str = DEFAULT_BRANCH,
        repo_type: str = "model",
        author: str = "localhub",
        lfs: bool | None = None,
        delete: Iterable[str] = (),
    ) -> str:
        """Commit ``files`` (path in repo -> bytes, text, or a local file streamed from disk) and delete ``delete``
        paths on branch ``revision``, bypassing HTTP; return the commit id.

        ``lfs=None`` decides per file like the preupload endpoint (size, suffix, binary content).
        Raises the storage errors (``RevisionNotFound``, ``BadRequest`` ...).
        """
        ops: list[AddFile | DeleteFile | DeleteFolder] = []
        for path, src in files.items():
            if isinstance(src, os.PathLike):
                with open(src, "rb") as f:
                    sample = f.read(512)
                    f.seek(0)
                    sha, size = self.storage.store_stream(repo_type, repo_id, f)
            else:
                data = src.encode() if isinstance(src, str) else bytes(src)
                sample, size = data[:512], len(data)
                sha = self.storage.store_bytes(repo_type, repo_id, data)
            is_lfs = lfs if lfs is not None else choose_upload_mode(path, size, sample) == "lfs"
            ops.append(AddFile(path, sha, size, lfs=is_lfs and size > 0))
        ops += [DeleteFile(p) for p in delete]
        return self.storage.commit(repo_type, repo_id, revision, ops, title=message, author=author).id

    def resolve(self, repo_id: str, revision: str = DEFAULT_BRANCH, *, repo_type: str = "model") -> str | None:
        """Commit id ``revision`` points to, ``None`` on an empty repo. Raises ``RevisionNotFound``/``RepoNotFound``."""
        return self.storage.resolve(repo_type, repo_id, revision)

    def file_entry(
        self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH, *, repo_type: str = "model"
    ) -> FileEntry:
        """The stored metadata (size, sha256, git oid, lfs flag) of a file. Raises ``EntryNotFound``."""
        _, files = self.storage.snapshot(repo_type, repo_id, revision)
        if path not in files:
            raise EntryNotFound(f"{path} does not exist at {revision}")
        return files[path]

    def object_path(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH, *, repo_type: str = "model") -> Path:
        """On-disk object holding ``path``'s content at ``revision`` (to corrupt it in tests).

        Objects are content-addressed: every file and commit with the same bytes in this repo shares the object.
        Raises ``EntryNotFound``/``RevisionNotFound``/``RepoNotFound``.
        """
        entry = self.file_entry(repo_id, path, revision, repo_type=repo_type)
        return self.storage.object_path(repo_type, repo_id, entry.sha256)
