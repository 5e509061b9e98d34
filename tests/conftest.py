# =====================================================================================================================
# Local Hub fixtures (hubmerge/testing/localhub). Keep this section self-contained; other sections may be added around it.
# =====================================================================================================================
import os as _lh_os

# The client reads these when huggingface_hub is first imported, so they are set at conftest import time:
# no Xet (the local Hub speaks plain HTTP + LFS basic transfer), no telemetry, and never a proxy for loopback.
_lh_os.environ["HF_HUB_DISABLE_XET"] = "1"
_lh_os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
_lh_no_proxy = [h for h in _lh_os.environ.get("NO_PROXY", "").split(",") if h]
_lh_no_proxy = ",".join(dict.fromkeys([*_lh_no_proxy, "127.0.0.1", "localhost"]))
_lh_os.environ["NO_PROXY"] = _lh_os.environ["no_proxy"] = _lh_no_proxy

import pytest as _lh_pytest  # noqa: E402


@_lh_pytest.fixture
def localhub(tmp_path, monkeypatch):
    """A running :class:`hubmerge.testing.localhub.LocalHub` on a fresh root (``tmp_path / "hub"``), stopped afterwards.

    Also makes sure the already-imported client is online and Xet-free, whatever the environment says. Create users
    with ``localhub.add_user("alice", orgs=["hfl"])`` (returns a token) and point the client at ``localhub.url``.
    """
    from huggingface_hub import constants

    from hubmerge.testing.localhub import LocalHub

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with LocalHub(tmp_path / "hub") as hub:
        yield hub


# ============================================ end of local Hub fixtures ============================================


# =====================================================================================================================
# Tiny model fixtures (hubmerge/testing/tinymodels via tests/support.py).
# =====================================================================================================================


@_lh_pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A :class:`support.ModelCache`: tiny real-format bases and adapters, built once per session."""
    from support import ModelCache

    return ModelCache(tmp_path_factory.mktemp("models"))


# =====================================================================================================================
# A local Hub with the tiny Plus recipe published, shared by the Hub flow and bad-input tests.
# =====================================================================================================================
@_lh_pytest.fixture(scope="session")
def _published_hub(tmp_path_factory, models):
    from huggingface_hub import HfApi
    from support import ALPACA_REPO, BASE_REPO, LLAMA_REPO

    from hubmerge.testing.localhub import LocalHub

    with LocalHub(tmp_path_factory.mktemp("published-hub")) as server:
        server.tokens = {name: server.add_user(name) for name in ("hfl", "alice", "bob")}
        server.tokens["alice-read"] = server.add_token("alice", role="read")
        base = models.base()
        llama, alpaca = models.plus_recipe(base)
        server.local = {"base": base, LLAMA_REPO: llama, ALPACA_REPO: alpaca}
        for repo, folder, owner, private in (
            (LLAMA_REPO, llama, "hfl", False),
            (ALPACA_REPO, alpaca, "hfl", False),
            (BASE_REPO, base, "alice", True),
        ):
            api = HfApi(endpoint=server.url, token=server.tokens[owner])
            api.create_repo(repo, private=private)
            api.upload_folder(repo_id=repo, folder_path=folder)
        yield server


@_lh_pytest.fixture
def hub(_published_hub):
    """The session's local Hub (see ``_published_hub``): the Plus adapters public under "hfl", the base private under
    "alice"; ``hub.tokens`` (hfl, alice, bob, alice-read) and ``hub.local`` (the folders published). Faults a test
    injects are cleared after it."""
    yield _published_hub
    _published_hub.faults.clear()


# =====================================================================================================================
# The hash cache (hubmerge/verification/hashing.py) of the test session: in a temporary folder, never the user's.
# =====================================================================================================================
@_lh_pytest.fixture(scope="session", autouse=True)
def _session_hash_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("hash-cache") / "file-hashes.json"
    old = _lh_os.environ.get("HUBMERGE_HASH_CACHE")
    _lh_os.environ["HUBMERGE_HASH_CACHE"] = str(path)  # subprocesses (the CLI) inherit it
    yield path
    if old is None:
        del _lh_os.environ["HUBMERGE_HASH_CACHE"]
    else:
        _lh_os.environ["HUBMERGE_HASH_CACHE"] = old
