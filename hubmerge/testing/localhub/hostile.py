"""A hostile Hub endpoint for tests (TEST-ONLY, standard library only): an HTTP proxy in front of a real local Hub
that lets a test rewrite any answer (status, headers, body), make a body endless, or never answer at all, and that
records every request it receives (so a test can tell where the token went).

    with HostileProxy(hub.url) as proxy:
        proxy.rewrite = lambda x: x.set("X-Repo-Commit", "../../x") if "/resolve/" in x.path else None
        ... point HF_ENDPOINT at proxy.url ...

With ``upstream=None`` it is a bare server that answers ``200 {}`` to everything: a stand-in for a foreign host.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

__all__ = ["Exchange", "HostileProxy"]

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


@dataclass
class Exchange:
    """One request and the answer about to be sent; a rewrite function may change any field.

    ``declared``: the Content-Length to send (None: the body's real length; HEAD answers keep the upstream's).
    ``endless``: after ``body``, keep sending bytes until the client hangs up (no Content-Length is sent).
    ``hang``: never answer (checked before the upstream is asked when set by ``proxy.hang``).
    """

    method: str
    path: str
    request_headers: dict[str, str]
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    declared: int | None = None
    endless: bool = False
    hang: bool = False

    def get(self, name: str) -> str | None:
        """The answer's header ``name`` (case-insensitive), or None."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def set(self, name: str, value: str | None) -> None:
        """Replace (or with None remove) the answer's header ``name``."""
        self.headers = [(k, v) for k, v in self.headers if k.lower() != name.lower()]
        if value is not None:
            self.headers.append((name, value))


@dataclass(frozen=True)
class Seen:
    """A request as the proxy received it."""

    method: str
    path: str
    authorization: str | None


class HostileProxy:
    """The proxy; ``rewrite(exchange)`` runs on every answer, ``hang(exchange)`` before asking the upstream."""

    def __init__(self, upstream: str | None, host: str = "127.0.0.1") -> None:
        self.upstream = urlsplit(upstream) if upstream else None
        self.rewrite: Callable[[Exchange], None] | None = None
        self.hang: Callable[[Exchange], bool] | None = None
        self.seen: list[Seen] = []
        self.endless_bytes = 0
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer((host, 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HostileProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _serve(self) -> None:
                body = self._body()
                proxy.seen.append(Seen(self.command, self.path, self.headers.get("Authorization")))
                x = Exchange(self.command, self.path, dict(self.headers.items()))
                if proxy.hang is not None and proxy.hang(x):
                    proxy._stop.wait()
                    self.close_connection = True
                    return
                if proxy.upstream is None:
                    x.headers, x.body = [("Content-Type", "application/json")], b"{}"
                else:
                    conn = http.client.HTTPConnection(proxy.upstream.hostname or "", proxy.upstream.port, timeout=60)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    answer = conn.getresponse()
                    x.status, x.headers, x.body = answer.status, answer.getheaders(), answer.read()
                    conn.close()
                    if self.command == "HEAD":
                        length = x.get("Content-Length")
                        x.declared = int(length) if length and length.isdigit() else None
                if proxy.rewrite is not None:
                    proxy.rewrite(x)
                self._answer(x)

            def _answer(self, x: Exchange) -> None:
                self.send_response(x.status)
                for k, v in x.headers:
                    if k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                if x.endless:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                elif x.declared is not None or self.command != "HEAD":
                    self.send_header("Content-Length", str(x.declared if x.declared is not None else len(x.body)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                try:
                    self.wfile.write(x.body)
                    while x.endless and not proxy._stop.is_set():
                        self.wfile.write(b"\0" * 65536)
                        proxy.endless_bytes += 65536
                except OSError:
                    self.close_connection = True

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

        return Handler
