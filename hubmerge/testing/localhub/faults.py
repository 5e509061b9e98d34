"""Fault injection for the local Hub (TEST-ONLY).

Faults are small data records, settable in-process (``hub.faults.add({...})`` or the helper methods) or over HTTP
(``POST /_localhub/faults`` with the same JSON, accepted from loopback clients that send the server's admin secret,
``LocalHub.admin_headers``). Kinds:

``drop``
    Close the connection after ``after_bytes`` bytes of the body of a ``GET .../resolve/...`` of file ``path`` in
    ``repo`` (counted per response, so a resumed ``Range`` request gets ``after_bytes`` more bytes before it is cut).
``status``
    Answer ``status`` (e.g. 503) to requests whose decoded URL path matches the regex ``match`` (and ``method``, if
    set). Note that the client retries 408/429/5xx with back-off (1 s, 2 s, 4 s ...), so keep ``times`` small.
``corrupt``
    Serve the file ``path`` of ``repo`` with one byte flipped (the middle one), same length and same headers, as a
    bad disk or proxy would. Alternatively corrupt the stored object on disk via ``LocalHub.object_path``.
``hostile_name``
    List an extra file called ``name`` (e.g. ``../evil`` or ``/etc/x``) in the model info siblings, tree listings
    and paths-info of ``repo``, serving ``content`` (text) if it is downloaded.

Every fault has ``times``: how many requests it affects (``None``: unlimited; ``hostile_name`` ignores it) and a
``hits`` counter. Exhausted faults stay listed (with ``remaining == 0``) so tests can check they fired.
"""

from __future__ import annotations

import builtins
import re
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Fault", "FaultInjector", "FAULT_KINDS"]

FAULT_KINDS: tuple[str, ...] = ("drop", "status", "corrupt", "hostile_name")


@dataclass
class Fault:
    """One injected fault; see the module docstring for the meaning of each field per ``kind``."""

    kind: str
    repo: str | None = None
    repo_type: str = "model"
    path: str | None = None
    after_bytes: int = 0
    status: int = 500
    match: str | None = None
    method: str | None = None
    name: str | None = None
    content: str = "hostile file\n"
    times: int | None = 1
    id: int = 0
    hits: int = 0
    remaining: int | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Serialisable view, as returned by ``GET /_localhub/faults``."""
        return asdict(self)


class FaultInjector:
    """Thread-safe registry of active faults, consulted by the request handler on every request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._next_id = 1

    # -- configuration ------------------------------------------------------------------------------------------------
    def add(self, spec: Mapping[str, Any] | Fault) -> int:
        """Register a fault from a :class:`Fault` or a JSON-like mapping; return its id.

        Raises ``ValueError`` for an unknown kind or field, or missing required fields.
        """
        if isinstance(spec, Fault):
            fault = Fault(**{k: v for k, v in asdict(spec).items() if k not in ("id", "hits", "remaining")})
        else:
            allowed = set(Fault.__dataclass_fields__) - {"id", "hits", "remaining"}
            unknown = set(spec) - allowed
            if unknown:
                raise ValueError(f"unknown fault field(s): {sorted(unknown)}")
            fault = Fault(**dict(spec))
        if fault.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {fault.kind!r}")
        needs = {
            "drop": ("repo", "path"),
            "corrupt": ("repo", "path"),
            "hostile_name": ("repo", "name"),
            "status": ("match",),
        }
        missing = [k for k in needs[fault.kind] if getattr(fault, k) in (None, "")]
        if missing:
            raise ValueError(f"fault kind {fault.kind!r} needs {missing}")
        if fault.kind == "status":
            re.compile(fault.match or "")  # fail now, not inside a request
            if not 100 <= fault.status <= 599:
                raise ValueError("status must be an HTTP status code")
        if fault.times is not None and fault.times < 0:
            raise ValueError("times must be >= 0 or None")
        with self._lock:
            fault.id = self._next_id
            self._next_id += 1
            fault.remaining = fault.times
            self._faults.append(fault)
            return fault.id

    def drop_after(
        self, repo_id: str, path: str, nbytes: int, *, times: int | None = 1, repo_type: str = "model"
    ) -> int:
        """Cut downloads of ``path`` after ``nbytes`` body bytes, ``times`` times; return the fault id."""
        return self.add(
            {
                "kind": "drop",
                "repo": repo_id,
                "repo_type": repo_type,
                "path": path,
                "after_bytes": nbytes,
                "times": times,
            }
        )

    def fail_status(self, match: str, status: int = 500, *, times: int | None = 1, method: str | None = None) -> int:
        """Answer ``status`` to requests whose path matches regex ``match``, ``times`` times; return the fault id."""
        return self.add({"kind": "status", "match": match, "status": status, "times": times, "method": method})

    def corrupt(self, repo_id: str, path: str, *, times: int | None = None, repo_type: str = "model") -> int:
        """Serve ``path`` with one byte flipped (same length), ``times`` times (default always); return the id."""
        return self.add({"kind": "corrupt", "repo": repo_id, "repo_type": repo_type, "path": path, "times": times})

    def hostile_name(
        self, repo_id: str, name: str = "../evil", *, content: str = "hostile file\n", repo_type: str = "model"
    ) -> int:
        """List an extra file ``name`` in ``repo_id``'s listings (serving ``content``); return the fault id."""
        return self.add(
            {
                "kind": "hostile_name",
                "repo": repo_id,
                "repo_type": repo_type,
                "name": name,
                "content": content,
                "times": None,
            }
        )

    def remove(self, fault_id: int) -> None:
        """Remove one fault. Raises ``KeyError`` if there is no such id."""
        with self._lock:
            for i, f in enumerate(self._faults):
                if f.id == fault_id:
                    del self._faults[i]
                    return
        raise KeyError(fault_id)

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def list(self) -> list[dict[str, Any]]:
        """Return a snapshot of all faults (including exhausted ones) as dicts with ``hits`` and ``remaining``."""
        with self._lock:
            return [f.to_json() for f in self._faults]

    def get(self, fault_id: int) -> dict[str, Any]:
        """Return one fault as a dict (to read its ``hits``). Raises ``KeyError``."""
        for f in self.list():
            if f["id"] == fault_id:
                return f
        raise KeyError(fault_id)

    # -- hooks used by the server -------------------------------------------------------------------------------------
    def _take(self, pred: Any) -> Fault | None:
        # Consume one use of the first matching, non-exhausted fault.
        with self._lock:
            for f in self._faults:
                if f.remaining == 0 or not pred(f):
                    continue
                f.hits += 1
                if f.remaining is not None:
                    f.remaining -= 1
                return Fault(**{k: v for k, v in asdict(f).items()})
        return None

    def take_status(self, method: str, path: str) -> int | None:
        """Status code to answer instead of handling ``method path``, or ``None``."""
        f = self._take(
            lambda f: (
                f.kind == "status"
                and (f.method is None or f.method.upper() == method)
                and re.search(f.match or "", path) is not None
            )
        )
        return f.status if f else None

    def take_drop(self, repo_type: str, repo_id: str, path: str) -> int | None:
        """Byte count after which to cut this download, or ``None``."""
        f = self._take(lambda f: f.kind == "drop" and (f.repo_type, f.repo, f.path) == (repo_type, repo_id, path))
        return f.after_bytes if f else None

    def take_corrupt(self, repo_type: str, repo_id: str, path: str) -> bool:
        """Whether to flip a byte in this download."""
        return (
            self._take(lambda f: f.kind == "corrupt" and (f.repo_type, f.repo, f.path) == (repo_type, repo_id, path))
            is not None
        )

    def hostile_entries(self, repo_type: str, repo_id: str) -> builtins.list[tuple[str, bytes]]:
        """``(name, content)`` of the hostile file names to list for a repo."""
        with self._lock:
            return [
                (f.name or "", f.content.encode())
                for f in self._faults
                if f.kind == "hostile_name" and (f.repo_type, f.repo) == (repo_type, repo_id)
            ]
