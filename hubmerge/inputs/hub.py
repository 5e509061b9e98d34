"""The one place that talks to the Hub client: which endpoint, which token, which cache, and how the client's
exceptions become one-line messages that say what to do. Tokens never appear in any message.

Token sources, in order: an explicit ``token`` (``--token``), then what ``huggingface_hub`` finds itself
(``HF_TOKEN``, then the token saved by ``hf auth login``). The endpoint is ``HF_ENDPOINT`` (read by the client at
import) unless one is passed explicitly, as the demo and the tests do for the local server.

Every call runs inside :func:`hub_errors`, which also puts :mod:`.guard` around it: the endpoint's answers are
checked before the client uses them, and retries are counted (``HUBMERGE_HUB_RETRIES``, default 2).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HubAccessError, OutputError
from ..sizes import format_size
from .guard import Expected, install, watch

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _default_retries() -> int:
    value = os.environ.get("HUBMERGE_HUB_RETRIES", "2")
    return int(value) if value.isdigit() else 2


@dataclass(frozen=True)
class Hub:
    """How to reach the Hub: ``endpoint`` (None: the client's default), ``token`` (None: the client's usual
    sources; False: anonymous), ``cache_dir`` (None: the standard HF cache)."""

    endpoint: str | None = None
    token: str | bool | None = None
    cache_dir: Path | None = None
    retries: int = field(default_factory=_default_retries)

    def api(self):
        """A ``huggingface_hub.HfApi`` bound to this endpoint and token (behind the guard of :mod:`.guard`)."""
        from huggingface_hub import HfApi

        install(self.url)
        return HfApi(endpoint=self.url, token=self.token)

    @property
    def cache_root(self) -> Path:
        """The HF cache folder downloads go to (never written by anything but the client)."""
        from huggingface_hub import constants

        return Path(self.cache_dir or constants.HF_HUB_CACHE).expanduser()

    @property
    def url(self) -> str:
        """The endpoint requests go to; passed explicitly to every client call so all of them agree."""
        from huggingface_hub import constants

        return (self.endpoint or constants.ENDPOINT).rstrip("/")

    def has_token(self) -> bool:
        """Whether requests will carry a token (without revealing it)."""
        if self.token is False:
            return False
        if self.token:
            return True
        from huggingface_hub import get_token

        return get_token() is not None

    def __repr__(self) -> str:  # keep the token out of any repr that ends up in a log
        return f"Hub(endpoint={self.endpoint!r}, token={'<set>' if self.token else self.token!r})"


@contextlib.contextmanager
def hub_errors(
    hub: Hub,
    repo_id: str,
    action: str = "read",
    revision: str | None = None,
    filename: str | None = None,
    expected: Expected | None = None,
) -> Iterator[None]:
    """Run one Hub call behind the guard (a file downloaded inside must match ``expected``: the listing's size and
    digest) and turn the client's exceptions into one-line errors naming ``repo_id`` and the fix.

    Raises:
        HubAccessError: the Hub refused, could not be reached, or answered something the guard refuses.
        OutputError: the disk holding the cache filled up during a download.
    """
    from huggingface_hub import constants
    from huggingface_hub import errors as e

    login = "log in (`hf auth login`, HF_TOKEN or --token)"
    try:
        with watch(hub.url, hub.retries, expected):
            yield
    except e.OfflineModeIsEnabled:
        raise HubAccessError(
            f"{repo_id}: HF_HUB_OFFLINE=1 is set and {filename or 'what hubmerge needs'} is not in the cache "
            f"({hub.cache_root}); unset HF_HUB_OFFLINE to download it"
        ) from None
    except e.GatedRepoError:
        raise HubAccessError(
            f"{repo_id} is gated: request access at {hub.url}/{repo_id}, then {login} with the "
            "account that was granted access",
            repo_id=repo_id,
            remedy="login",
        ) from None
    except e.RevisionNotFoundError:
        raise HubAccessError(
            f"{repo_id}: revision {revision!r} not found; check the branch, tag or commit after the @"
        ) from None
    except e.RepositoryNotFoundError:
        who = "your token cannot see it" if hub.has_token() else "you are not logged in"
        raise HubAccessError(
            f"{repo_id}: repository not found, or private and {who}; check the name, or {login} "
            "with an account that can read it",
            repo_id=repo_id,
            remedy="login",
        ) from None
    except e.LocalEntryNotFoundError:  # the client's name for "could not download and not cached"
        if constants.is_offline_mode():
            raise HubAccessError(
                f"{repo_id}: HF_HUB_OFFLINE=1 is set and {filename!r} is not in the cache ({hub.cache_root}); "
                "unset HF_HUB_OFFLINE to download it"
            ) from None
        raise HubAccessError(
            f"{repo_id}: connection to the Hub at {hub.url} failed while downloading {filename!r}, "
            "even after retries; check your connection or HF_ENDPOINT, then retry"
        ) from None
    except (e.EntryNotFoundError, e.RemoteEntryNotFoundError):
        raise HubAccessError(
            f"{repo_id}: file {filename!r} not found at {revision or 'main'}; the repository is "
            "incomplete, check it holds a full adapter or model"
        ) from None
    except e.HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status == 401:
            raise HubAccessError(
                f"{repo_id}: the Hub rejected your token (401); {login} again with a valid token",
                repo_id=repo_id,
                remedy="login",
            ) from None
        if status == 403:
            raise HubAccessError(
                f"{repo_id}: your token may not {action} this repository (403); use a token "
                "with write access to that namespace",
                repo_id=repo_id,
                remedy="login",
            ) from None
        raise HubAccessError(
            f"{repo_id}: the Hub at {hub.url} answered {status} while trying to {action}; retry later"
        ) from None
    except OSError as exc:  # connection refused/reset, timeouts (httpx errors are not OSErrors: caught below)
        if exc.errno in _DISK_FULL:
            raise _disk_full(hub, repo_id, filename, expected, exc) from None
        raise HubAccessError(
            f"{repo_id}: cannot reach the Hub at {hub.url} ({type(exc).__name__}); check your connection or HF_ENDPOINT"
        ) from None
    except Exception as exc:
        if type(exc).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise HubAccessError(
                f"{repo_id}: connection to the Hub at {hub.url} failed ({type(exc).__name__}); "
                "check your connection or HF_ENDPOINT, then retry (downloads resume)"
            ) from None
        raise


def _disk_full(hub: Hub, repo_id: str, filename: str | None, expected: Expected | None, exc: OSError) -> OutputError:
    """The one line for a download that ran out of room: the disk, its free space and what the file needs."""
    root = next((p for p in [hub.cache_root, *hub.cache_root.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(root).free
    size = f"{format_size(expected.size)} needed for it" if expected and expected.size is not None else "more needed"
    cause = "the file size limit (ulimit -f) was reached" if exc.errno == errno.EFBIG else "the disk filled up"
    return OutputError(
        f"{hub.cache_root}: {cause} while downloading {repo_id}/{filename} ({format_size(free)} free, {size}); "
        "free some space or choose another --cache-dir (HF_HUB_CACHE), then run again: downloads resume"
    )


def hub_from_args(token: str | None, cache_dir: str | Path | None, endpoint: str | None) -> Hub:
    """The Hub settings of a call: explicit values, else HF_TOKEN / the saved login, the HF cache, HF_ENDPOINT."""
    return Hub(endpoint=endpoint, token=token, cache_dir=Path(cache_dir).expanduser() if cache_dir else None)
