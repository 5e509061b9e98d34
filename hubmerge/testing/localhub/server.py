"""The local Hub's HTTP layer: routes the Hub API that ``huggingface_hub`` uses onto :class:`HubStorage`.

Standard library only (``http.server.ThreadingHTTPServer``, HTTP/1.1 keep-alive). See
``docs/hub-api.md`` for the endpoint shapes; error statuses and ``X-Error-Code`` headers are chosen
so that ``huggingface_hub.utils.hf_raise_for_status`` raises the same exception classes as against the real Hub.
Xet is not implemented: clients must run with ``HF_HUB_DISABLE_XET=1`` (downloads then use plain HTTP, uploads the
LFS "basic" transfer).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

from .faults import FaultInjector
from .frontmatter import card_data, split_front_matter
from .storage import (
    DEFAULT_BRANCH,
    REPO_TYPES,
    SHA256_RE,
    AddFile,
    BadRequest,
    DeleteFile,
    DeleteFolder,
    EntryNotFound,
    FileEntry,
    Forbidden,
    HubError,
    HubStorage,
    Principal,
    RepoMeta,
    RepoNotFound,
    choose_upload_mode,
    git_blob_sha1,
    now_iso,
)
from .throttle import Link, ThrottledReader, ThrottledWriter

__all__ = ["ADMIN_HEADER", "HubHTTPServer", "RequestRecord", "State", "URL_PREFIX"]

_TYPE_BY_PLURAL = {f"{t}s": t for t in REPO_TYPES}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_MAX_JSON_BODY = 16 * 1024 * 1024
_MAX_NDJSON_LINE = 64 * 1024 * 1024  # one regular (non-LFS) file, base64-encoded; LFS content never goes here
_UPLOAD_TICKET_TTL = 3600.0
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"  # exact text the client special-cases
_LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
# The control endpoints that change accounts or behaviour need the admin secret the server was started with.
ADMIN_HEADER = "X-Localhub-Admin"
_SECRET_QUERY_RE = re.compile(r"(?i)((?:ticket|token|sig|signature)=)[^&]*")


@dataclass(frozen=True)
class RequestRecord:
    """One served request, for tests: method, path (secrets in the query masked), status and the Range header."""

    method: str
    path: str
    status: int
    range: str | None


@dataclass
class _Ticket:
    # A one-time upload authorisation embedded in the LFS upload href (the client sends no Authorization there).
    repo_type: str
    repo_id: str
    oid: str
    size: int
    expires: float


class State:
    """Everything the request handlers share; owned by :class:`~hubmerge.testing.localhub.hub.LocalHub`."""

    def __init__(
        self,
        storage: HubStorage,
        faults: FaultInjector,
        *,
        verbose: bool,
        tree_page_size: int,
        admin_secret: str,
        bandwidth: int | None = None,
    ) -> None:
        self.storage = storage
        self.admin_secret = admin_secret
        # (client -> server, server -> client), each shared by all connections; None: unthrottled
        self.links = (Link(bandwidth), Link(bandwidth)) if bandwidth else None
        self.faults = faults
        self.verbose = verbose
        self.tree_page_size = tree_page_size
        self.hostport = ""
        self.tickets: dict[str, _Ticket] = {}
        self.tickets_lock = threading.Lock()
        self.requests: deque[RequestRecord] = deque(maxlen=10_000)

    def issue_ticket(self, repo_type: str, repo_id: str, oid: str, size: int) -> str:
        now = time.time()
        tok = secrets.token_urlsafe(24)
        with self.tickets_lock:
            for k in [k for k, t in self.tickets.items() if t.expires < now]:
                del self.tickets[k]
            self.tickets[tok] = _Ticket(repo_type, repo_id, oid, size, now + _UPLOAD_TICKET_TTL)
        return tok


def _mask(path: str) -> str:
    """``path`` with secret query values (upload tickets) replaced by ``***``, for logs."""
    return _SECRET_QUERY_RE.sub(r"\1***", path)


class _Body:
    """The request body as a stream: Content-Length bounded or chunked, never read beyond its end."""

    def __init__(self, rfile: Any, length: int | None, chunked: bool) -> None:
        self._rfile = rfile
        self._remaining = length if not chunked else None
        self._chunked = chunked
        self._chunk_left = 0
        self._eof = (length == 0) if not chunked else False
        self._buf = bytearray()

    @property
    def finished(self) -> bool:
        """Whether the whole body has been consumed."""
        return self._eof and not self._buf

    def _raw(self, n: int) -> bytes:
        if self._eof:
            return b""
        if not self._chunked:
            assert self._remaining is not None
            data = bytes(self._rfile.read(min(n, self._remaining)))
            if not data:
                raise BadRequest("Request body ended before Content-Length")
            self._remaining -= len(data)
            self._eof = self._remaining == 0
            return data
        if self._chunk_left == 0:
            line = self._rfile.readline(1024)
            try:
                self._chunk_left = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest("Malformed chunked encoding") from None
            if self._chunk_left == 0:
                while self._rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self._eof = True
                return b""
        data = bytes(self._rfile.read(min(n, self._chunk_left)))
        if not data:
            raise BadRequest("Request body ended inside a chunk")
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            self._rfile.readline(16)  # CRLF after the chunk
        return data

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all remaining if ``n < 0``); ``b""`` at the end."""
        if n < 0:
            parts = [bytes(self._buf)]
            self._buf.clear()
            while chunk := self._raw(1 << 20):
                parts.append(chunk)
            return b"".join(parts)
        if self._buf:
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out
        return self._raw(n)

    def readline(self, limit: int) -> bytes:
        """Read one line (with its ``\\n``); raises :class:`BadRequest` if it is longer than ``limit``."""
        while b"\n" not in self._buf:
            if len(self._buf) > limit:
                raise BadRequest(f"Line longer than {limit} bytes in the request body")
            chunk = self._raw(1 << 16)
            if not chunk:
                break
            self._buf += chunk
        idx = self._buf.find(b"\n")
        end = len(self._buf) if idx < 0 else idx + 1
        if end > limit:
            raise BadRequest(f"Line longer than {limit} bytes in the request body")
        line = bytes(self._buf[:end])
        del self._buf[:end]
        return line


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """``(start, end_exclusive)`` for one satisfiable byte range, ``None`` to send everything, ``"bad"`` for 416."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # multi-range or garbage: RFC 7233 lets us ignore it and send 200
    if not m.group(1):
        suffix = int(m.group(2))
        if suffix == 0:
            return "bad"
        return max(0, size - suffix), size
    start = int(m.group(1))
    end = int(m.group(2)) + 1 if m.group(2) else size
    if start >= size or end <= start:
        return "bad"
    return start, min(end, size)


def _list_field(body: Mapping[str, Any], key: str) -> list[Any]:
    """``body[key]`` if it is a list (``[]`` when absent); raises :class:`BadRequest` otherwise."""
    value = body.get(key, [])
    if not isinstance(value, list):
        raise BadRequest(f"{key!r} must be a list")
    return value


def _truthy(v: str | None) -> bool:
    return v is not None and v.lower() in ("1", "true", "yes")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client pools connections
    server_version = "hubmerge-localhub/1.0"
    timeout = 300  # an idle keep-alive connection frees its thread eventually
    disable_nagle_algorithm = True  # headers and body are separate writes: Nagle + delayed ACK would add 40 ms each
    server: HubHTTPServer

    # -- plumbing -----------------------------------------------------------------------------------------------------
    @property
    def st(self) -> State:
        return self.server.state

    def setup(self) -> None:
        super().setup()
        if self.st.links is not None:
            self.rfile = ThrottledReader(self.rfile, self.st.links[0])  # type: ignore[assignment]
            self.wfile = ThrottledWriter(self.wfile, self.st.links[1])  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
        # The default logger prints the raw request line (which can hold an upload ticket): only masked, only verbose.
        if self.st.verbose:
            sys.stderr.write("localhub: " + _mask(format % args) + "\n")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        status = int(code) if str(code).isdigit() else 0
        path = _mask(getattr(self, "path", ""))
        headers = getattr(self, "headers", None)
        rng = headers.get("Range") if headers is not None else None
        self.st.requests.append(RequestRecord(getattr(self, "command", "") or "", path, status, rng))
        if self.st.verbose:
            sys.stderr.write(f"localhub: {getattr(self, 'command', '')} {path} {status}\n")

    def _dispatch(self) -> None:
        self._headers_sent = False
        self._body: _Body | None = None
        raw, _, query = self.path.partition("?")
        self._raw_path = raw
        self._query = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        # Split before unquoting: the client quotes revisions with safe="" so "a/b" arrives as one "a%2Fb" segment.
        segs = [unquote(s) for s in raw.split("/")[1:]]
        try:
            injected = self.st.faults.take_status(self.command, unquote(raw))
            if injected is not None:
                raise HubError(f"Injected fault: HTTP {injected}", status=injected)
            self._route(segs)
        except HubError as e:
            self._send_error(e)
        except (ConnectionError, TimeoutError):  # the client went away or stalled mid-request
            self.close_connection = True
        except Exception as e:  # a bug: report it, keep serving
            traceback.print_exc(file=sys.stderr)
            self._send_error(HubError(f"Internal server error: {type(e).__name__}: {e}", status=500))
        finally:
            self._finish_body()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _finish_body(self) -> None:
        # Unread request bytes would be parsed as the next request on this keep-alive connection: read a small
        # remainder, otherwise give up on keep-alive for this connection.
        try:
            body = self._body if self._body is not None else self._open_body(strict=False)
            if body is None or body.finished:
                return
            length = int(self.headers.get("Content-Length") or -1)
            if 0 <= length <= 1 << 20 and not self.close_connection:
                body.read()
                return
        except (HubError, OSError, ValueError):
            pass
        self.close_connection = True

    def _open_body(self, strict: bool = True) -> _Body | None:
        if self._body is not None:
            return self._body
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        length_h = self.headers.get("Content-Length")
        try:
            length = int(length_h) if length_h is not None else None
        except ValueError:
            if strict:
                raise BadRequest("Invalid Content-Length") from None
            return None
        if length is not None and length < 0:
            raise BadRequest("Invalid Content-Length")
        self._body = _Body(self.rfile, 0 if (length is None and not chunked) else length, chunked)
        return self._body

    def _read_json(self, limit: int = _MAX_JSON_BODY) -> dict[str, Any]:
        """The request body as a JSON object (or form fields); raises :class:`BadRequest` for anything else."""
        data = self._read_json_any(limit)
        if not isinstance(data, dict):
            raise BadRequest("Request body must be a JSON object")
        return data

    def _read_json_any(self, limit: int = _MAX_JSON_BODY) -> Any:
        body = self._open_body()
        assert body is not None
        data = body.read(limit + 1)
        while len(data) <= limit and (more := body.read(limit + 1 - len(data))):
            data += more
        if len(data) > limit:
            raise BadRequest(f"Request body larger than {limit} bytes")
        if not data.strip():
            return {}
        ctype = (self.headers.get("Content-Type") or "").lower()
        if "application/x-www-form-urlencoded" in ctype:
            try:
                fields = parse_qs(data.decode("utf-8"), strict_parsing=False)
            except UnicodeDecodeError:
                raise BadRequest("Form body is not valid UTF-8") from None
            return {k: (v if len(v) > 1 or k == "paths" else v[0]) for k, v in fields.items()}
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("Request body is not valid JSON") from None

    def _base_url(self) -> str:
        # URLs we hand out (commit, repo, LFS upload) must match the endpoint the client was given.
        host = self.headers.get("Host") or self.st.hostport
        return f"http://{host}"

    def _start(self, status: int, headers: Mapping[str, str], length: int) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._headers_sent = True

    def _send_bytes(self, data: bytes, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._start(status, headers or {}, len(data))
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(self, obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        hdrs = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        self._send_bytes(json.dumps(obj).encode(), status, hdrs)

    def _send_error(self, e: HubError) -> None:
        if self._headers_sent:  # too late for a status line: cut the connection so the client sees an error
            self.close_connection = True
            return
        if self._body is not None and not self._body.finished:
            self.close_connection = True  # a rejected upload's remaining bytes are not worth reading
        msg = " ".join(e.message.split())
        headers = {"X-Error-Message": msg.encode("ascii", "replace").decode("ascii")[:1000], **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._send_json({"error": msg}, e.status, headers)

    def _principal(self) -> Principal | None:
        """The caller, ``None`` if anonymous. An unknown or malformed token is a 401 on every endpoint."""
        header = self.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        who = self.st.storage.auth.authenticate(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if who is None:
            raise HubError(_INVALID_CREDENTIALS, status=401)
        return who

    def _require_loopback(self) -> None:
        if self.client_address[0] not in _LOOPBACK:
            raise Forbidden("The /_localhub control endpoints only answer loopback clients")

    def _require_admin(self) -> None:
        # Any local process can reach loopback: minting tokens and injecting faults also need the start-up secret.
        given = (self.headers.get(ADMIN_HEADER) or "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, self.st.admin_secret.encode()):
            raise Forbidden(f"The /_localhub control endpoints need the admin secret printed at start ({ADMIN_HEADER})")

    def _repo(
        self, repo_type: str, repo_id: str, who: Principal | None, *, write: bool = False, download: bool = False
    ) -> RepoMeta:
        """The repo's metadata if ``who`` may see it (and write to it / download from it), else the Hub's error."""
        try:
            meta: RepoMeta | None = self.st.storage.get_meta(repo_type, repo_id)
        except RepoNotFound:
            meta = None
        if meta is None or (meta.private and not (who and who.is_member(meta.namespace))):
            # Same answer for missing and hidden repos, so private names don't leak.
            raise RepoNotFound(
                f"Repository not found: {repo_id}. If it is private, make sure you are authenticated.",
                status=401 if who is None else 404,
            )
        if write:
            if who is None:
                raise HubError("You must be authenticated to write to a repo", status=401)
            if not who.is_member(meta.namespace):
                raise Forbidden(f"You don't have the rights to write to {repo_id}")
            if not who.can_write:
                raise Forbidden(f"This token has the read role: it cannot write to {repo_id}")
        if download and meta.gated:
            allowed = who is not None and (who.is_member(meta.namespace) or who.name in meta.gated_allowed)
            if not allowed:
                raise HubError(
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
                    status=401 if who is None else 403,
                    code="GatedRepo",
                )
        return meta

    # -- routing ------------------------------------------------------------------------------------------------------
    def _route(self, segs: list[str]) -> None:
        m = self.command
        if segs[:1] == ["api"]:
            self._route_api(segs[1:])
            return
        if segs[:1] == ["_localhub"]:
            self._route_control(segs[1:])
            return
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type, segs = _TYPE_BY_PLURAL[segs[0]], segs[1:]
        if (
            len(segs) >= 6
            and segs[1].endswith(".git")
            and segs[2:] == ["info", "lfs", "objects", "batch"]
            and m == "POST"
        ):
            self._lfs_batch(repo_type, f"{segs[0]}/{segs[1][:-4]}")
            return
        if len(segs) >= 5 and segs[2] == "resolve" and m in ("GET", "HEAD"):
            self._resolve(repo_type, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
            return
        raise HubError(f"Not found: {m} {self._raw_path}", status=404)

    def _route_api(self, s: list[str]) -> None:
        m = self.command
        if s == ["whoami-v2"] and m == "GET":
            return self._whoami()
        if s == ["repos", "create"] and m == "POST":
            return self._create_repo()
        if s == ["repos", "delete"] and m == "DELETE":
            return self._delete_repo()
        if s == ["validate-yaml"] and m == "POST":
            return self._validate_yaml()
        if len(s) == 1 and s[0] in _TYPE_BY_PLURAL and m == "GET":
            return self._list_repos(_TYPE_BY_PLURAL[s[0]])
        if len(s) >= 3 and s[0] in _TYPE_BY_PLURAL:
            repo_type, repo_id, rest = _TYPE_BY_PLURAL[s[0]], f"{s[1]}/{s[2]}", s[3:]
            action, args = (rest[0], rest[1:]) if rest else ("", [])
            joined = "/".join(args)
            if action == "" and m == "GET":
                return self._info(repo_type, repo_id, None)
            if action == "revision" and args and m == "GET":
                return self._info(repo_type, repo_id, joined)
            if action == "settings" and m == "PUT":
                return self._settings(repo_type, repo_id)
            if action == "tree" and args and m == "GET":
                return self._tree(repo_type, repo_id, args[0], "/".join(args[1:]).strip("/"))
            if action == "paths-info" and args and m == "POST":
                return self._paths_info(repo_type, repo_id, joined)
            if action == "refs" and not args and m == "GET":
                return self._refs(repo_type, repo_id)
            if action == "commits" and m == "GET":
                return self._commits(repo_type, repo_id, joined or DEFAULT_BRANCH)
            if action == "preupload" and args and m == "POST":
                return self._preupload(repo_type, repo_id, joined)
            if action == "commit" and args and m == "POST":
                return self._commit(repo_type, repo_id, joined)
            if action == "tag" and args and m in ("POST", "DELETE"):
                return self._tag(repo_type, repo_id, joined)
            if action == "branch" and args and m in ("POST", "DELETE"):
                return self._branch(repo_type, repo_id, joined)
        raise HubError(f"Not found: {m} {self._raw_path}", status=404)

    # -- control endpoints (test-only, loopback-only; all but health need the admin secret) -----------------------------
    def _route_control(self, s: list[str]) -> None:
        m = self.command
        if s[:1] == ["lfs-upload"] and len(s) == 5 and m == "PUT":
            return self._lfs_upload(_TYPE_BY_PLURAL.get(s[1], ""), f"{s[2]}/{s[3]}", s[4])
        if s[:1] == ["lfs-verify"] and len(s) == 4 and m == "POST":
            return self._lfs_verify(_TYPE_BY_PLURAL.get(s[1], ""), f"{s[2]}/{s[3]}")
        self._require_loopback()
        if s == ["health"] and m == "GET":
            return self._send_json({"ok": True})
        self._require_admin()
        if s == ["faults"]:
            if m == "GET":
                return self._send_json({"faults": self.st.faults.list()})
            if m == "DELETE":
                self.st.faults.clear()
                return self._send_json({"faults": []})
            if m == "POST":
                spec = self._read_json_any()
                specs = spec.get("faults", [spec]) if isinstance(spec, dict) else spec
                if not isinstance(specs, list) or not all(isinstance(f, dict) for f in specs):
                    raise BadRequest('Expected a fault object, a list of them, or {"faults": [...]}')
                try:
                    ids = [self.st.faults.add(f) for f in specs]
                except (ValueError, TypeError, re.error) as e:
                    raise BadRequest(f"Invalid fault: {e}") from None
                return self._send_json({"ids": ids})
        if s[:1] == ["faults"] and len(s) == 2 and m == "DELETE":
            try:
                self.st.faults.remove(int(s[1]))
            except (KeyError, ValueError):
                raise HubError(f"No fault {s[1]}", status=404) from None
            return self._send_json({})
        if s == ["users"] and m == "POST":
            body = self._read_json()
            try:
                token = self.st.storage.auth.add_user(
                    str(body["name"]),
                    role=body.get("role", "write"),
                    orgs=body.get("orgs", ()),
                    token=body.get("token"),
                )
            except (KeyError, ValueError, TypeError) as e:
                raise BadRequest(f"Invalid user: {e}") from None
            return self._send_json({"name": body["name"], "token": token})
        raise HubError(f"Not found: {m} {self._raw_path}", status=404)

    # -- account ------------------------------------------------------------------------------------------------------
    def _whoami(self) -> None:
        who = self._principal()
        if who is None:
            raise HubError(_INVALID_CREDENTIALS, status=401)
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(who.name.encode()).hexdigest()[:24],
                "name": who.name,
                "fullname": who.name,
                "email": f"{who.name}@localhub.invalid",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [
                    {
                        "type": "org",
                        "id": hashlib.sha1(o.encode()).hexdigest()[:24],
                        "name": o,
                        "fullname": o,
                        "roleInOrg": "write",
                        "isEnterprise": False,
                    }
                    for o in who.orgs
                ],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "localhub", "role": who.role, "createdAt": now_iso()},
                },
            }
        )

    # -- repos --------------------------------------------------------------------------------------------------------
    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self._base_url()}/{URL_PREFIX[repo_type]}{repo_id}"

    def _create_repo(self) -> None:
        who = self._principal()
        body = self._read_json()
        if who is None:
            raise HubError("You must be authenticated to create a repo", status=401)
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise BadRequest(f"Invalid repo type {repo_type!r}")
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("Missing repo name")
        namespace = body.get("organization") or who.name
        repo_id = f"{namespace}/{name}"
        if not who.can_write:
            raise Forbidden(f"This token has the read role: it cannot create {repo_id}")
        if not who.is_member(namespace):
            raise Forbidden(f"You don't have the rights to create a {repo_type} under the namespace {namespace!r}")
        private = body.get("visibility") == "private" or body.get("private") is True
        try:
            self.st.storage.create_repo(repo_type, repo_id, private=private, sdk=body.get("sdk"))
        except HubError as e:
            if e.status == 409:
                self._send_json(
                    {"error": e.message, "url": self._repo_url(repo_type, repo_id)}, 409, {"X-Error-Message": e.message}
                )
                return
            raise
        url = self._repo_url(repo_type, repo_id)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        who = self._principal()
        body = self._read_json()
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES or not body.get("name"):
            raise BadRequest("Invalid repo type or name")
        namespace = body.get("organization") or (who.name if who else "")
        repo_id = f"{namespace}/{body['name']}"
        self._repo(repo_type, repo_id, who, write=True)
        self.st.storage.delete_repo(repo_type, repo_id)
        self._send_json({})

    def _settings(self, repo_type: str, repo_id: str) -> None:
        who = self._principal()
        meta = self._repo(repo_type, repo_id, who, write=True)
        body = self._read_json()
        if "gated" in body:
            if body["gated"] not in ("auto", "manual", False):
                raise BadRequest("gated must be 'auto', 'manual' or false")
            meta.gated = body["gated"]
        if "visibility" in body:
            if body["visibility"] not in ("private", "public"):
                raise BadRequest("visibility must be 'private' or 'public'")
            meta.private = body["visibility"] == "private"
        if isinstance(body.get("private"), bool):
            meta.private = body["private"]
        self.st.storage.save_meta(meta)
        self._send_json({"private": meta.private, "gated": meta.gated})

    def _validate_yaml(self) -> None:
        self._principal()  # a bad token is still a 401
        body = self._read_json()
        content = body.get("content", "")
        if not isinstance(content, str):
            raise BadRequest("content must be a string")
        try:
            split_front_matter(content)
        except ValueError as e:
            self._send_json({"errors": [{"message": str(e)}], "warnings": []}, 400, {"X-Error-Message": str(e)})
            return
        self._send_json({"errors": [], "warnings": []})

    # -- read side -----------------------------------------------------------------------------------------------------
    def _hostile(self, repo_type: str, repo_id: str) -> dict[str, tuple[FileEntry, bytes]]:
        out = {}
        for name, content in self.st.faults.hostile_entries(repo_type, repo_id):
            sha = hashlib.sha256(content).hexdigest()
            out[name] = (FileEntry(name, len(content), sha, git_blob_sha1(content), False), content)
        return out

    def _listing(self, repo_type: str, repo_id: str, files: Mapping[str, FileEntry]) -> dict[str, FileEntry]:
        # Real files plus injected hostile names (the latter only ever in listings, never in storage).
        merged = dict(files)
        for name, (entry, _) in self._hostile(repo_type, repo_id).items():
            merged[name] = entry
        return merged

    def _info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        who = self._principal()
        meta = self._repo(repo_type, repo_id, who)
        self._send_json(self._info_record(repo_type, repo_id, meta, revision, _truthy(self._query.get("blobs"))))

    def _list_repos(self, repo_type: str) -> None:
        """``GET /api/models`` (and datasets, spaces): the repos the caller may see, newest change first, filtered as
        the Hub does by ``author``, ``filter`` (a tag of the card's metadata) and ``search`` (in the name); ``limit``
        caps the answer (one page: the client follows no Link header here). Card data is always included."""
        who = self._principal()
        q = self._query
        found = []
        for marker in sorted((self.st.storage.root / "repos" / f"{repo_type}s").glob("*/*/meta.json")):
            repo_id = f"{marker.parent.parent.name}/{marker.parent.name}"
            if q.get("author") and marker.parent.parent.name != q["author"]:
                continue
            if q.get("search") and q["search"].lower() not in repo_id.lower():
                continue
            try:
                meta = self._repo(repo_type, repo_id, who)
            except HubError:
                continue
            info = self._info_record(repo_type, repo_id, meta, None, False)
            if q.get("filter") and q["filter"] not in info["tags"]:
                continue
            info.pop("siblings")
            found.append(info)
        found.sort(key=lambda i: i["lastModified"] or "", reverse=True)
        limit = int(q["limit"]) if (q.get("limit") or "").isdigit() else len(found)
        self._send_json(found[:limit])

    def _info_record(
        self, repo_type: str, repo_id: str, meta: RepoMeta, revision: str | None, blobs: bool
    ) -> dict[str, Any]:
        commit, files = self.st.storage.snapshot(repo_type, repo_id, revision)
        siblings = []
        for path, e in sorted(self._listing(repo_type, repo_id, files).items()):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=e.size, blobId=e.oid)
                if e.lfs:
                    sib["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": e.pointer_size}
            siblings.append(sib)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId" if repo_type == "model" else "name": repo_id,
            "author": meta.namespace,
            "sha": commit.id if commit else None,
            "lastModified": commit.date if commit else meta.created_at,
            "createdAt": meta.created_at,
            "private": meta.private,
            "gated": meta.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in files.values()),
        }
        if repo_type == "space":
            info["sdk"] = meta.sdk
        readme = files.get("README.md")
        if readme is not None and readme.size <= 1 << 20:
            text = b"".join(self.st.storage.iter_object(repo_type, repo_id, readme.sha256)).decode("utf-8", "replace")
            data = card_data(text)
            if data is not None:
                info["cardData"] = data
                tags = data.get("tags")
                info["tags"] = [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
        return info

    @staticmethod
    def _tree_entry(e: FileEntry) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "file", "oid": e.oid, "size": e.size, "path": e.path}
        if e.lfs:
            d["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
        return d

    @staticmethod
    def _dir_entry(path: str, files: Mapping[str, FileEntry]) -> dict[str, Any]:
        # git would hash the tree object; a digest of the children's ids has the same "changes iff content changes".
        h = hashlib.sha1(b"tree\x00")
        for p in sorted(p for p in files if p.startswith(path + "/")):
            h.update(f"{p}\x00{files[p].oid}\n".encode())
        return {"type": "directory", "oid": h.hexdigest(), "size": 0, "path": path}

    def _entries(self, files: Mapping[str, FileEntry], prefix: str, recursive: bool) -> list[dict[str, Any]] | None:
        """Tree entries under ``prefix`` (``""`` = root); ``None`` if ``prefix`` is not a folder."""
        dirs: set[str] = set()
        for p in files:
            parts = p.split("/")
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if prefix and prefix not in dirs:
            return None
        base = prefix + "/" if prefix else ""

        def wanted(p: str) -> bool:
            if not p.startswith(base) or p == prefix:
                return False
            return recursive or "/" not in p[len(base) :]

        out = [self._dir_entry(d, files) for d in sorted(dirs) if wanted(d)]
        out += [self._tree_entry(files[p]) for p in sorted(files) if wanted(p)]
        return out

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        who = self._principal()
        self._repo(repo_type, repo_id, who)
        commit, files = self.st.storage.snapshot(repo_type, repo_id, revision)
        entries = self._entries(files, path, _truthy(self._query.get("recursive")))
        if entries is not None and not path:
            # Injected hostile names go verbatim into every root listing (they'd make no sense as folders).
            entries += [self._tree_entry(e) for e, _ in self._hostile(repo_type, repo_id).values()]
        if entries is None:
            raise EntryNotFound(
                f"{path} does not exist or is not a folder at {revision}",
                headers={"X-Repo-Commit": commit.id} if commit else None,
            )
        # Cursor pagination with a Link header, like the Hub (the client follows rel="next").
        try:
            start = int(self._query.get("cursor") or 0)
        except ValueError:
            raise BadRequest("Invalid cursor") from None
        size = self.st.tree_page_size
        page = entries[start : start + size]
        headers = {}
        if start + size < len(entries):
            q = {k: v for k, v in self._query.items() if k != "cursor"}
            q["cursor"] = str(start + size)
            headers["Link"] = f'<{self._base_url()}{self._raw_path}?{urlencode(q)}>; rel="next"'
        self._send_json(page, headers=headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        who = self._principal()
        self._repo(repo_type, repo_id, who)
        body = self._read_json()
        paths = [body["paths"]] if isinstance(body.get("paths"), str) else _list_field(body, "paths")
        _, files = self.st.storage.snapshot(repo_type, repo_id, revision)
        listing = self._listing(repo_type, repo_id, files)
        out = []
        for p in map(str, paths):
            if p in listing:
                out.append(self._tree_entry(listing[p]))
            elif (p := p.strip("/")) and any(f.startswith(p + "/") for f in files):
                out.append(self._dir_entry(p, files))
        self._send_json(out)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        who = self._principal()
        self._repo(repo_type, repo_id, who)
        refs = self.st.storage.refs(repo_type, repo_id)
        self._send_json(
            {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in sorted(refs.branches.items())
                ],
                "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in sorted(refs.tags.items())],
                "converts": [],
                "pullRequests": [],
            }
        )

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        who = self._principal()
        self._repo(repo_type, repo_id, who)
        self._send_json(
            [
                {
                    "id": c.id,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author, "avatar": None}],
                    "date": c.date,
                }
                for c in self.st.storage.history(repo_type, repo_id, revision)
            ]
        )

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        who = self._principal()
        self._repo(repo_type, repo_id, who, download=True)
        commit, files = self.st.storage.snapshot(repo_type, repo_id, revision)
        entry = files.get(path)
        content: bytes | None = None
        if entry is None:
            hostile = self._hostile(repo_type, repo_id).get(path)
            if hostile is None:
                raise EntryNotFound(
                    f"{path} does not exist at revision {revision}",
                    headers={"X-Repo-Commit": commit.id} if commit else None,
                )
            entry, content = hostile
        assert commit is not None  # an empty repo has no files, so we raised above
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{entry.etag}"',
            "X-Repo-Commit": commit.id,
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        if entry.lfs:
            # What the Hub puts on the redirect to its CDN; the client prefers these over ETag/Content-Length.
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        rng = _parse_range(self.headers.get("Range"), entry.size)
        if rng == "bad":
            raise HubError(
                f"Requested range not satisfiable (size {entry.size})",
                status=416,
                headers={"Content-Range": f"bytes */{entry.size}", "X-Repo-Commit": commit.id},
            )
        status, start, end = 200, 0, entry.size
        if isinstance(rng, tuple):
            status, (start, end) = 206, rng
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        if self.command == "HEAD":
            self._start(status, headers, end - start)
            return
        drop_after = self.st.faults.take_drop(repo_type, repo_id, path)
        flip_at = entry.size // 2 if entry.size and self.st.faults.take_corrupt(repo_type, repo_id, path) else None
        self._start(status, headers, end - start)
        chunks: Iterable[bytes] = (
            [content[start:end]]
            if content is not None
            else self.st.storage.iter_object(repo_type, repo_id, entry.sha256, start, end)
        )
        pos, sent = start, 0
        for chunk in chunks:
            if flip_at is not None and pos <= flip_at < pos + len(chunk):
                buf = bytearray(chunk)
                buf[flip_at - pos] ^= 0xFF
                chunk = bytes(buf)
            pos += len(chunk)
            if drop_after is not None and sent + len(chunk) >= drop_after:
                self.wfile.write(chunk[: drop_after - sent])
                self._abort()
                return
            self.wfile.write(chunk)
            sent += len(chunk)

    def _abort(self) -> None:
        # Simulate a network cut mid-body: the client has Content-Length and sees a truncated message.
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- write side ----------------------------------------------------------------------------------------------------
    def _branch_files(self, repo_type: str, repo_id: str, revision: str) -> dict[str, FileEntry]:
        _, files = self.st.storage.snapshot(repo_type, repo_id, revision)
        return files

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        who = self._principal()
        self._repo(repo_type, repo_id, who, write=True)
        body = self._read_json()
        files = self._branch_files(repo_type, repo_id, revision)
        out = []
        for f in _list_field(body, "files"):
            try:
                path, size = str(f["path"]), int(f["size"])
                sample = base64.b64decode(f.get("sample", ""), validate=False)
            except (KeyError, TypeError, ValueError, binascii.Error):
                raise BadRequest("Each file needs path, size and a base64 sample") from None
            mode = choose_upload_mode(path, size, sample)
            existing = files.get(path)
            # The client compares this oid with its own (sha256 for LFS, git sha1 otherwise) to skip unchanged files.
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json({"files": out})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        who = self._principal()
        self._repo(repo_type, repo_id, who, write=True)
        assert who is not None
        if _truthy(self._query.get("create_pr")):
            raise BadRequest("localhub does not support pull requests (create_pr)")
        body = self._open_body()
        assert body is not None
        header: dict[str, Any] | None = None
        ops: list[AddFile | DeleteFile | DeleteFolder] = []
        storage = self.st.storage
        # NDJSON is consumed line by line; regular files are stored as their line arrives.
        while line := body.readline(_MAX_NDJSON_LINE):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if not isinstance(value, dict):
                    raise TypeError
                if key == "header":
                    header = value
                elif key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise BadRequest("Only base64 file content is supported")
                    data = base64.b64decode(value["content"], validate=True)
                    sha = storage.store_bytes(repo_type, repo_id, data)
                    ops.append(AddFile(str(value["path"]), sha, len(data), lfs=False, git_oid=git_blob_sha1(data)))
                elif key == "lfsFile":
                    oid = str(value.get("oid", ""))
                    if value.get("algo", "sha256") != "sha256" or not SHA256_RE.match(oid):
                        raise BadRequest(f"Invalid LFS oid for {value.get('path')!r}")
                    size = value.get("size")
                    ops.append(AddFile(str(value["path"]), oid, int(size) if size is not None else None, lfs=True))
                elif key == "deletedFile":
                    ops.append(DeleteFile(str(value["path"])))
                elif key == "deletedFolder":
                    ops.append(DeleteFolder(str(value["path"])))
                else:
                    raise BadRequest(f"Unknown commit operation {key!r}")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, binascii.Error):
                raise BadRequest("Malformed NDJSON commit payload (bad line, key, path, content or size)") from None
        if header is None:
            raise BadRequest("The commit payload has no header")
        commit = storage.commit(
            repo_type,
            repo_id,
            revision,
            ops,
            title=str(header.get("summary") or "Update"),
            message=str(header.get("description") or ""),
            author=who.name,
            parent_commit=header.get("parentCommit"),
        )
        self._send_json(
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{commit.id}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _tag(self, repo_type: str, repo_id: str, arg: str) -> None:
        who = self._principal()
        self._repo(repo_type, repo_id, who, write=True)
        if self.command == "DELETE":
            self.st.storage.delete_tag(repo_type, repo_id, arg)
            return self._send_json({})
        body = self._read_json()
        tag = body.get("tag")
        if not isinstance(tag, str) or not tag:
            raise BadRequest("Missing tag name")
        self.st.storage.create_tag(repo_type, repo_id, tag, arg)
        self._send_json({})

    def _branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        who = self._principal()
        self._repo(repo_type, repo_id, who, write=True)
        assert who is not None
        if self.command == "DELETE":
            self.st.storage.delete_branch(repo_type, repo_id, branch)
            return self._send_json({})
        body = self._read_json()
        self.st.storage.create_branch(repo_type, repo_id, branch, body.get("startingPoint"), author=who.name)
        self._send_json({})

    # -- LFS ----------------------------------------------------------------------------------------------------------
    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        who = self._principal()
        self._repo(repo_type, repo_id, who, write=True)
        body = self._read_json()
        if body.get("operation") != "upload":
            raise BadRequest("localhub's LFS batch endpoint only supports the upload operation")
        transfers = body.get("transfers") or ["basic"]
        if not isinstance(transfers, list) or "basic" not in transfers:
            raise BadRequest("localhub only supports the basic LFS transfer")
        base, plural = self._base_url(), f"{repo_type}s"
        objects = []
        for o in _list_field(body, "objects"):
            oid, size = (o.get("oid"), o.get("size")) if isinstance(o, dict) else (None, None)
            if not isinstance(oid, str) or not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {
                        "oid": str(oid),
                        "size": size if isinstance(size, int) else 0,
                        "error": {"code": 422, "message": "Invalid oid or size"},
                    }
                )
                continue
            if self.st.storage.object_size(repo_type, repo_id, oid) == size:
                objects.append({"oid": oid, "size": size})  # already stored: no actions, the client skips it
                continue
            ticket = self.st.issue_ticket(repo_type, repo_id, oid, size)
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {
                            "href": f"{base}/_localhub/lfs-upload/{plural}/{repo_id}/{oid}?ticket={ticket}",
                            "expires_in": int(_UPLOAD_TICKET_TTL),
                        },
                        "verify": {"href": f"{base}/_localhub/lfs-verify/{plural}/{repo_id}"},
                    },
                }
            )
        self._send_json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_upload(self, repo_type: str, repo_id: str, oid: str) -> None:
        ticket_id = self._query.get("ticket", "")
        with self.st.tickets_lock:
            ticket = self.st.tickets.get(ticket_id)
        if (
            ticket is None
            or ticket.expires < time.time()
            or (ticket.repo_type, ticket.repo_id, ticket.oid) != (repo_type, repo_id, oid)
        ):
            raise Forbidden("Invalid or expired upload ticket")
        length = self.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) != ticket.size:
            raise BadRequest(f"Content-Length {length} does not match the announced size {ticket.size}")
        body = self._open_body()
        assert body is not None
        self.st.storage.store_stream(repo_type, repo_id, body, expected_sha256=oid, expected_size=ticket.size)
        with self.st.tickets_lock:
            self.st.tickets.pop(ticket_id, None)  # one-time: a replayed href is refused
        self._send_json({})

    def _lfs_verify(self, repo_type: str, repo_id: str) -> None:
        who = self._principal()
        self._repo(repo_type, repo_id, who, write=True)
        body = self._read_json()
        oid, size = body.get("oid"), body.get("size")
        if not isinstance(oid, str) or not SHA256_RE.match(oid):
            raise BadRequest("Invalid oid")
        if self.st.storage.object_size(repo_type, repo_id, oid) != size:
            raise HubError(f"LFS object {oid} of size {size} was not uploaded", status=404)
        self._send_json({"oid": oid, "size": size})


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], state: State) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.state = state
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        # A stopped server must look stopped: cut the idle keep-alive connections too.
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Client disconnects are routine (e.g. a cancelled download); other errors are bugs worth a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            return
        super().handle_error(request, client_address)
