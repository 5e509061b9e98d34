"""One guard on every request and answer of the Hub client: a Hub endpoint (often a mirror, ``HF_ENDPOINT``) is
hostile until checked.

``huggingface_hub`` builds cache paths from what the server says (``blobs/<ETag>``, ``refs/<revision>`` with the
``X-Repo-Commit`` it answered, ``.no_exist/<X-Repo-Commit>/...`` on a 404) and streams downloads until the server
stops. :func:`install` replaces the client's HTTP client (``huggingface_hub.set_client_factory``) by one whose
event hooks, on every hop of every call:

- send the token only to the endpoint's own origin (an LFS batch answer may name another host for upload/verify),
  whenever a hubmerge call is under way;
- ask for uncompressed bodies and refuse compressed ones, so a byte count on the wire is a byte count on disk;
- put connect and read timeouts on every request (the client leaves ``HfApi`` calls without any), honouring
  ``HF_HUB_ETAG_TIMEOUT`` (connect) and ``HF_HUB_DOWNLOAD_TIMEOUT`` (read, write);
- refuse commit ids that are not 40 lowercase hex, ETags that are not hex digests (40 or 64), sizes that are not
  numbers or differ from the listing, redirects to another host, and any body longer than it declared (or, for a
  file, than the listing says; an answer without a declared size is capped);
- count the client's retries within one hubmerge call (:func:`watch`), say each on one line, and give up after
  ``retries`` attempts without progress, so a server that accepts connections and never answers fails in seconds;
- send a file uploaded as a request body ``UPLOAD_CHUNK`` bytes at a time (:class:`UploadBody`).

A violation raises :class:`~hubmerge.errors.HubAccessError` naming the endpoint: nothing of the answer has reached a
path or another request by then.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urljoin, urlsplit

import httpx2

from ..errors import HubAccessError

COMMIT_ID = re.compile(r"[0-9a-f]{40}")
_ETAG = re.compile(r'(?:W/)?"?([0-9a-f]{40}|[0-9a-f]{64})"?')
_RESOLVE = re.compile(r"/resolve/([^/]+)/")
# Answers that declare no size (JSON listings) are cut here: the largest model_info of a real repo is a few MB.
API_BODY_LIMIT = 64 * 2**20
# The client sends a file body 64 KiB at a time, each piece a trip through its and h11's Python that takes the GIL
# from the merge (~36,000 per 2.3 GB pushed); 1 MiB pieces took ~1 s off a streamed push at 400 MB/s (0.6 CPU-s).
UPLOAD_CHUNK = 2**20
_RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
# The official Hub serves files from its CDN hosts (cdn-lfs.hf.co, cas-bridge.xethub.hf.co): redirects there are
# expected, from the Hub and from mirrors.
_OFFICIAL_HOSTS = ("huggingface.co", "hf.co")
log = logging.getLogger("hubmerge.hub")


@dataclass
class Expected:
    """What the listing says about the file a call downloads (the answer must agree)."""

    size: int | None = None
    digest: str | None = None  # sha256 for LFS files, git blob id for the others


@dataclass
class _Call:
    """State of one hubmerge call to the Hub (one :func:`watch` block): its retry budget and expectations."""

    retries: int
    expected: Expected
    failures: dict[tuple[str, str], int] = field(default_factory=dict)
    pending: dict[tuple[str, str], bool] = field(default_factory=dict)
    reason: str = "no answer"


_current: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("hubmerge_hub_call", default=None)
_trusted: set[tuple[str, str, int]] = set()
_lock = threading.Lock()
_installed = False
_active = 0  # hubmerge calls under way, in any thread (the client uploads from a thread pool)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return parts.scheme, (parts.hostname or "").lower(), port


def _name(origin: tuple[str, str, int]) -> str:
    return f"{origin[0]}://{origin[1]}:{origin[2]}"


def refuse(endpoint: str, what: str) -> HubAccessError:
    """The one-line error for an endpoint answer that fails a check."""
    return HubAccessError(f"the Hub at {endpoint} answered {what}: refusing; is HF_ENDPOINT a trusted mirror?")


def valid_digest(value: object, lengths: tuple[int, ...] = (40, 64)) -> bool:
    """Whether ``value`` is a lowercase hex digest of one of these lengths."""
    return isinstance(value, str) and len(value) in lengths and re.fullmatch(r"[0-9a-f]+", value) is not None


def install(endpoint: str) -> None:
    """Trust ``endpoint`` with the token and put the guarded HTTP client in place (once per process)."""
    global _installed
    with _lock:
        _trusted.add(_origin(endpoint))
        if _installed:
            return
        _installed = True
    import huggingface_hub

    # The client's own multi-line chatter about what hubmerge reports on one line: retries, and a disk too small.
    for name in ("huggingface_hub.utils._http", "huggingface_hub.file_download"):
        logging.getLogger(name).addFilter(_retry_chatter)
    warnings.filterwarnings("ignore", "Not enough free disk space", UserWarning, "huggingface_hub.file_download")
    huggingface_hub.set_client_factory(_client)


@contextlib.contextmanager
def watch(endpoint: str, retries: int, expected: Expected | None = None) -> Iterator[None]:
    """One hubmerge call to the Hub: requests made inside share a budget of ``retries`` retries without progress,
    and a file downloaded inside must match ``expected``."""
    global _active
    install(endpoint)
    token = _current.set(_Call(retries, expected or Expected()))
    with _lock:
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
        _current.reset(token)


@runtime_checkable
class SeekableFile(Protocol):
    """What the Hub client uploads from: a file object, or a slice of one (a part of a multipart upload)."""

    def read(self, n: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


class UploadBody:
    """A file as a request body, sent ``UPLOAD_CHUNK`` bytes at a time from where it stood when the request was built.

    The HTTP client reads a body that has ``read`` 64 KiB at a time, and sends an iterable's pieces as they come;
    ``tell``/``seek`` give it the Content-Length (so the body is not chunk-encoded). Each iteration starts over from
    that position, so a body the client sends again (a 307 redirect) is whole; a retry builds a new request, from
    where the Hub client rewound the file.
    """

    def __init__(self, file: SeekableFile) -> None:
        self._file, self._start = file, file.tell()

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def __iter__(self) -> Iterator[bytes]:
        self._file.seek(self._start)
        while chunk := self._file.read(UPLOAD_CHUNK):
            yield chunk


class _Client(httpx2.Client):
    """The Hub client's HTTP client: file bodies are sent as :class:`UploadBody`."""

    def build_request(
        self, method: str, url: Any, *, content: Any = None, data: Any = None, **kwargs: Any
    ) -> httpx2.Request:
        if data is not None and not isinstance(data, Mapping):  # raw bytes or a file passed as ``data``
            content, data = data, None
        if isinstance(content, SeekableFile):
            with contextlib.suppress(OSError):  # not seekable (a pipe): sent the client's own way, chunk-encoded
                content = UploadBody(content)
        return super().build_request(method, url, content=content, data=data, **kwargs)


def _client() -> httpx2.Client:
    from huggingface_hub.utils._http import hf_request_event_hook

    return _Client(
        event_hooks={"request": [hf_request_event_hook, _on_request], "response": [_on_response]},
        follow_redirects=True,
        timeout=httpx2.Timeout(**_timeouts({})),
    )


def _timeouts(given: dict[str, Any]) -> dict[str, float]:
    """Connect/read/write/pool timeouts: what the caller asked, but never none and never more than the limits."""
    from huggingface_hub import constants

    connect = float(constants.HF_HUB_ETAG_TIMEOUT)
    transfer = float(max(constants.HF_HUB_DOWNLOAD_TIMEOUT, constants.HF_HUB_ETAG_TIMEOUT))
    limits = {"connect": connect, "read": transfer, "write": transfer, "pool": connect}
    return {k: min(v, given[k]) if given.get(k) is not None else v for k, v in limits.items()}


def _trusted_origin(url: str) -> bool:
    return _origin(url) in _trusted


def _allowed_redirect(source: str, target: str) -> bool:
    """A redirect may stay on the origin that answered, go to a subdomain of its host (a mirror's CDN), or go over
    https to the official Hub's own hosts (huggingface.co, hf.co and their CDN subdomains, where the official Hub and
    mirrors send file downloads). Another port of the same host is another service: refused."""
    origin, to = _origin(source), _origin(target)
    if to == origin:
        return True
    official = to[0] == "https" and any(to[1] == d or to[1].endswith("." + d) for d in _OFFICIAL_HOSTS)
    return official or (to[0] == origin[0] and to[1].endswith("." + origin[1]))


def _key(request) -> tuple[str, str]:
    return request.method, str(request.url)


def _on_request(request) -> None:
    url = str(request.url)
    if _active and not _trusted_origin(url):
        # While hubmerge talks to the Hub, the token goes to the endpoint and nowhere else (other callers of the
        # client in this process, outside hubmerge's calls, keep the client's own rules).
        request.headers.pop("authorization", None)
    request.headers["accept-encoding"] = "identity"
    request.extensions = {**request.extensions, "timeout": _timeouts(dict(request.extensions.get("timeout") or {}))}
    call = _current.get()
    if call is None:
        return
    key = _key(request)
    failures = call.failures.get(key, 0) + (1 if call.pending.get(key) else 0)
    call.failures[key] = failures
    call.pending[key] = True
    if failures == 0:
        return
    where = _name(_origin(url))
    what = f"{request.method} {urlsplit(url).path}"
    if failures > call.retries:
        raise HubAccessError(
            f"the Hub at {where} did not answer {what} after {failures} attempts ({call.reason}); check your "
            "connection or HF_ENDPOINT, then retry (downloads resume)"
        )
    log.warning(f"retrying: {what} at {where} ({call.reason}), attempt {failures + 1} of {call.retries + 1}")


def _on_response(response) -> None:
    request = response.request
    url = str(request.url)
    where = _name(_origin(url))
    call = _current.get()
    headers = response.headers
    commit = headers.get("x-repo-commit")
    if commit is not None:
        if not COMMIT_ID.fullmatch(commit):
            raise refuse(where, "an invalid commit id")
        pinned = _RESOLVE.search(urlsplit(url).path)
        if pinned and COMMIT_ID.fullmatch(unquote(pinned[1])) and commit != unquote(pinned[1]):
            raise refuse(where, f"commit {commit[:12]} for a file pinned to commit {unquote(pinned[1])[:12]}")
    location = headers.get("location")
    if location is not None and not _allowed_redirect(url, urljoin(url, location)):
        raise refuse(where, f"a redirect to another host ({_name(_origin(urljoin(url, location)))})")
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise refuse(where, f"a {encoding}-compressed body although none was asked for")
    declared = _size(headers.get("content-length"), where, "Content-Length")
    expected = call.expected if call else Expected()
    is_file = _RESOLVE.search(urlsplit(url).path) is not None and _trusted_origin(url)
    if is_file and response.status_code < 400:
        tag = headers.get("x-linked-etag") or headers.get("etag")
        m = _ETAG.fullmatch(tag) if tag is not None else None
        if tag is not None and m is None:
            raise refuse(where, "an invalid ETag (not a hex digest)")
        if m and expected.digest and m[1] != expected.digest:
            raise refuse(where, f"a file whose ETag {m[1][:12]} differs from its listing ({expected.digest[:12]})")
        linked = _size(headers.get("x-linked-size"), where, "X-Linked-Size")
        size = linked if linked is not None else (declared if response.status_code == 200 else None)
        if expected.size is not None and size is not None and size != expected.size:
            raise refuse(where, f"a file size of {size} bytes where its listing says {expected.size}")
    limit = _body_limit(response, declared, expected, where)
    if call is not None:
        if response.status_code in _RETRYABLE:
            call.reason = f"it answered {response.status_code}"
    response.stream = _Capped(response.stream, limit, where, _key(request), call, response.status_code)


def _size(value: str | None, where: str, header: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or len(value) > 18:
        raise refuse(where, f"an invalid {header} ({value[:20]!r})")
    return int(value)


def _body_limit(response, declared: int | None, expected: Expected, where: str) -> int:
    """The most body bytes this answer may carry: what it declared; for a file download, no more than what is left
    of the listed size; for an API answer (or any answer that declares no size), no more than API_BODY_LIMIT."""
    request = response.request
    if expected.size is not None and request.method == "GET" and response.status_code in (200, 206):
        start = 0
        if response.status_code == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("content-range", ""))
            if m is None or int(m[1]) > expected.size:
                raise refuse(where, "an invalid Content-Range")
            start = int(m[1])
        return min(declared if declared is not None else expected.size, expected.size - start)
    if declared is None or (_trusted_origin(str(request.url)) and "/resolve/" not in request.url.path):
        return min(declared if declared is not None else API_BODY_LIMIT, API_BODY_LIMIT)
    return declared


class _Capped(httpx2.SyncByteStream):
    """The body of one answer, cut with an error at ``limit`` bytes; progress resets the call's retry count."""

    def __init__(self, inner, limit: int, where: str, key: tuple[str, str], call: _Call | None, status: int):
        self._inner, self._limit, self._where, self._key, self._call = inner, limit, where, key, call
        self._retryable = status in _RETRYABLE

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for chunk in self._inner:
            seen += len(chunk)
            if seen > self._limit:
                raise refuse(self._where, f"more bytes than it declared ({self._limit}) for {self._key[1]}")
            if chunk and self._call is not None:
                self._call.failures[self._key] = 0
            yield chunk
        if self._call is not None and not self._retryable:
            self._call.pending[self._key] = False

    def close(self) -> None:
        self._inner.close()


class _RetryChatter(logging.Filter):
    """The client logs each retry on two or more lines with full URLs; keep its reason for hubmerge's one line."""

    _PATTERNS = ("thrown while requesting", "Retrying in", "Trying to resume", "Max retries exceeded", "Rate limited")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not any(p in message for p in self._PATTERNS):
            return True
        call = _current.get()
        if call is not None and "thrown while requesting" in message:
            call.reason = message.split(" thrown while", 1)[0].strip("'") or "no answer"
        elif call is not None and "Trying to resume" in message:
            call.reason = message.split("\n", 1)[0].rsplit(": ", 1)[-1] or "connection lost"
        return False


_retry_chatter = _RetryChatter()
