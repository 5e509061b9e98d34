# =====================================================================================================================
# Local Hub fixtures (hubmerge/localhub). Keep this section self-contained; other sections may be added around it.
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
    """A running :class:`hubmerge.localhub.LocalHub` on a fresh root (``tmp_path / "hub"``), stopped afterwards.

    Also makes sure the already-imported client is online and Xet-free, whatever the environment says. Create users
    with ``localhub.add_user("alice", orgs=["hfl"])`` (returns a token) and point the client at ``localhub.url``.
    """
    from huggingface_hub import constants

    from hubmerge.localhub import LocalHub

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with LocalHub(tmp_path / "hub") as hub:
        yield hub


# ============================================ end of local Hub fixtures ============================================


# =====================================================================================================================
# Tiny model fixtures (hubmerge/tinymodels via tests/support.py).
# =====================================================================================================================

@_lh_pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A :class:`support.ModelCache`: tiny real-format bases and adapters, built once per session."""
    from support import ModelCache

    return ModelCache(tmp_path_factory.mktemp("models"))
