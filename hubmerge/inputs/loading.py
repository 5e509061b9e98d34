"""From specs to opened inputs: resolve every source, download and verify what comes from the Hub, and open the
base and the adapters lazily (headers and configs only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..model.adapters import Adapter, open_adapter
from ..model.base import ArrivingWeights, BaseModel
from ..model.loader import open_base
from ..progress import Progress
from ..resources import check_disk
from ..verification.known import check_tokenizer_matches
from .hub import Hub
from .sources import Source, fetch, not_cached, resolve

PathLike = str | Path


@dataclass
class Inputs:
    """Resolved, fetched, verified and opened inputs."""

    base_source: Source
    base: BaseModel
    adapter_sources: list[Source]
    adapters: list[Adapter]

    @property
    def sources(self) -> list[Source]:
        return [self.base_source, *self.adapter_sources]


def resolve_inputs(adapters: Sequence[PathLike], base: PathLike, hub: Hub) -> tuple[Source, list[Source]]:
    """Resolve the base and every adapter (local folders, or Hub repos pinned to a commit); nothing is downloaded.

    Raises:
        InputError, HubAccessError, UnsafeFileError.
    """
    if not adapters:
        raise InputError("no adapters given; name at least one LoRA adapter (folder or Hub ID)")
    return resolve(base, "base", hub), [resolve(a, "adapter", hub) for a in adapters]


def _check_download_space(sources: Sequence[Source], hub: Hub) -> None:
    """Refuse before downloading when the cache's disk cannot hold what is still to download."""
    todo = sum(src.remote[name].size for src in sources for name in not_cached(src, hub))
    if todo:
        hub.cache_root.mkdir(parents=True, exist_ok=True)
        check_disk(hub.cache_root, todo, "the downloads")


def open_inputs(
    base_src: Source,
    adapter_srcs: Sequence[Source],
    hub: Hub,
    *,
    progress: Progress,
    verify: bool = True,
    arriving: ArrivingWeights | None = None,
) -> Inputs:
    """Download and verify what comes from the Hub (adapters first: they are small and fail fast), check tokenizers
    by hash, and open everything lazily. A Meta checkpoint base is verified by its checklists and the known-hash
    table (unless ``verify`` is false); the SHA256 computed for that are kept for the recipe. With ``arriving``
    (a streamed push, :mod:`hubmerge.stream`), the base's weights are not downloaded here: they arrive while the
    merge runs.

    Raises:
        HubmergeError subclasses with a one-line message.
    """
    _check_download_space([*adapter_srcs, base_src] if arriving is None else adapter_srcs, hub)
    for src in [*adapter_srcs, base_src]:
        fetch(src, hub, progress=progress, weights=arriving is None or src is not base_src)
    opened = [open_adapter(s.local, s.label) for s in adapter_srcs]
    for src, adapter in zip(adapter_srcs, opened):
        sha = adapter.tokenizer.sha256() if adapter.tokenizer else None
        check_tokenizer_matches(adapter.label, src.repo_id, sha, adapter.vocab_size)
    base_model = open_base(base_src.local, verify=verify, arriving=arriving)
    for name, digest in base_model.hashes.items():
        base_src.hashes.setdefault(name, digest)
    return Inputs(base_src, base_model, list(adapter_srcs), opened)
