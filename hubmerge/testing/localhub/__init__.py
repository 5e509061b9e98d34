"""A local, offline, Hugging Face Hub-compatible HTTP server for tests and demos (standard library only).

The real ``huggingface_hub`` client talks to it unchanged (``HfApi(endpoint=hub.url)``, ``hf_hub_download(...,
endpoint=hub.url)``) as long as ``HF_HUB_DISABLE_XET=1`` is set before ``huggingface_hub`` is imported::

    from hubmerge.testing.localhub import LocalHub
    with LocalHub(root) as hub:
        token = hub.add_user("alice", role="write", orgs=["hfl"])
        api = HfApi(endpoint=hub.url, token=token)
        ...

Command line: ``python -m hubmerge.testing.localhub --port 0 --root DIR [--user NAME:TOKEN:ROLE] [--org ORG:MEMBER,...]``
(prints the URL, then the admin secret the HTTP control endpoints need in ``X-Localhub-Admin``).

Modules: :mod:`.storage` (on-disk repos, commits, refs, objects, users), :mod:`.server` (HTTP routes),
:mod:`.hub` (:class:`LocalHub`), :mod:`.faults` (test-only fault injection), :mod:`.frontmatter` (README YAML).
"""

from .faults import Fault, FaultInjector
from .hub import LocalHub
from .server import RequestRecord
from .storage import (
    BadRequest,
    Commit,
    Conflict,
    EntryNotFound,
    FileEntry,
    Forbidden,
    HubError,
    HubStorage,
    RepoMeta,
    RepoNotFound,
    RevisionNotFound,
    choose_upload_mode,
    git_blob_sha1,
)

__all__ = [
    "LocalHub",
    "HubStorage",
    "Fault",
    "FaultInjector",
    "RequestRecord",
    "FileEntry",
    "Commit",
    "RepoMeta",
    "HubError",
    "RepoNotFound",
    "RevisionNotFound",
    "EntryNotFound",
    "BadRequest",
    "Forbidden",
    "Conflict",
    "choose_upload_mode",
    "git_blob_sha1",
]
