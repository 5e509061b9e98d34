"""The one place that talks to the Hub client: which endpoint, which token, which cache, and how the client's
exceptions become one-line messages that say what to do. Tokens never appear in any message.

Token sources, in order: an explicit ``token`` (``--token``), then what ``huggingface_hub`` finds itself
(``HF_TOKEN``, then the token saved by ``hf auth login``). The endpoint is ``HF_ENDPOINT`` (read by the client at
import) unless one is passed explicitly, as the demo and the tests do for the local server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import HubAccessError


@dataclass(frozen=True)
class Hub:
    """How to reach the Hub: ``endpoint`` (None: the client's default), ``token`` (None: the client's usual
    sources; False: anonymous), ``cache_dir`` (None: the standard HF cache)."""

    endpoint: str | None = None
    token: str | bool | None = None
    cache_dir: Path | None = None

    def api(self):
        """A ``huggingface_hub.HfApi`` bound to this endpoint and token."""
        from huggingface_hub import HfApi

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
    hub: Hub, repo_id: str, action: str = "read", revision: str | None = None, filename: str | None = None
) -> Iterator[None]:
    """Turn the client's exceptions raised inside the block into :class:`HubAccessError` with a message naming
    ``repo_id`` and the fix."""
    from huggingface_hub import errors as e

    login = "log in (`hf auth login`, HF_TOKEN or --token)"
    try:
        yield
    except e.GatedRepoError:
        raise HubAccessError(
            f"{repo_id} is gated: request access at {hub.url}/{repo_id}, then {login} with the "
            "account that was granted access"
        ) from None
    except e.RevisionNotFoundError:
        raise HubAccessError(
            f"{repo_id}: revision {revision!r} not found; check the branch, tag or commit after the @"
        ) from None
    except e.RepositoryNotFoundError:
        who = "your token cannot see it" if hub.has_token() else "you are not logged in"
        raise HubAccessError(
            f"{repo_id}: repository not found, or private and {who}; check the name, or {login} "
            "with an account that can read it"
        ) from None
    except e.LocalEntryNotFoundError:  # the client's name for "could not download and not cached"
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
                f"{repo_id}: the Hub rejected your token (401); {login} again with a valid token"
            ) from None
        if status == 403:
            raise HubAccessError(
                f"{repo_id}: your token may not {action} this repository (403); use a token "
                "with write access to that namespace"
            ) from None
        raise HubAccessError(
            f"{repo_id}: the Hub at {hub.url} answered {status} while trying to {action}; retry later"
        ) from None
    except OSError as exc:  # connection refused/reset, timeouts (httpx errors are not OSErrors: caught below)
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
