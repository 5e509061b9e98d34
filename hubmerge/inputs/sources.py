"""Resolve and fetch: turn what the user named (a local folder, or a Hub ID ``org/name[@revision]``) into a
:class:`Source` whose files sit in a local folder, downloading only what the merge needs and verifying each file
against the Hub's record as it arrives.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from ..errors import HubAccessError, InputError, UnsafeFileError, VerificationError
from ..jsonio import index_weight_map
from ..model.tokenizer import TOKENIZER_FILES
from ..progress import Progress, ProgressEvent
from ..verification.hashing import file_digest, git_blob_sha1
from ..verification.known import check_known_file
from .guard import COMMIT_ID, Expected, refuse, valid_digest
from .hub import Hub, hub_errors

Role = Literal["adapter", "base"]
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")

# What each kind of input needs, by file name; weights are the first layout present.
ADAPTER_NEEDS = ("adapter_config.json", "config.json")  # config.json: long-context LoRAs ship one
ADAPTER_WEIGHTS = (("adapter_model.safetensors",), ("adapter_model.bin",))
BASE_NEEDS = ("config.json", "generation_config.json", "params.json", "checklist.chk")
BASE_WEIGHTS = (
    ("model.safetensors.index.json",),
    ("model.safetensors",),
    ("pytorch_model.bin.index.json",),
    ("pytorch_model.bin",),
    ("consolidated.*.pth",),
)
COMMON = TOKENIZER_FILES + ("tokenizer_checklist.chk", "README.md")
# The weight files a sharded layout's index names, when the index itself has not been read yet (download sizes).
SHARDS_OF_INDEX = {
    "model.safetensors.index.json": "*.safetensors",
    "pytorch_model.bin.index.json": "pytorch_model*.bin",
}
_VERIFY_BAR_BYTES = 64 * 2**20


@dataclass(frozen=True)
class RemoteFile:
    """A file as the Hub records it: size, and SHA256 (LFS files) or git blob id (small files)."""

    size: int
    sha256: str | None
    blob_id: str | None

    @property
    def expected(self) -> Expected:
        """What a download of this file must match (size, and the digest the Hub serves as its ETag)."""
        return Expected(self.size, self.sha256 or self.blob_id)


@dataclass
class Source:
    """A resolved input. ``path`` holds its files (a local folder, or the HF cache snapshot once fetched); Hub inputs
    also carry the repo, the revision asked for, the commit it resolved to and the Hub's record of each file.
    ``hashes`` collects the SHA256 of every file used, for the recipe."""

    spec: str
    role: Role
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    remote: dict[str, RemoteFile] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def local(self) -> Path:
        """The folder holding the source's files: set by :func:`resolve` for folders, by :func:`fetch` for Hub repos."""
        if self.path is None:
            raise RuntimeError(f"{self.label}: used before fetch()")  # a bug in the caller, not bad input
        return self.path

    @property
    def label(self) -> str:
        """Short name for messages: ``org/name@commit7`` or the folder as given."""
        if self.repo_id:
            return f"{self.repo_id}@{self.commit[:7]}" if self.commit else self.repo_id
        return self.spec

    @property
    def name(self) -> str:
        """Last component of the repo or folder name (default output folder names use it)."""
        return (self.repo_id or str(Path(self.spec).expanduser().resolve())).rstrip("/").rsplit("/", 1)[-1]


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; None when ``spec`` is not shaped like a Hub ID."""
    m = _HUB_ID.match(spec)
    return (m["repo"], m["rev"]) if m else None


def resolve(spec: str | Path, role: Role, hub: Hub) -> Source:
    """Resolve an input: an existing local folder wins (as in transformers), else a Hub ID is looked up on the Hub.

    Returns:
        a :class:`Source` (Hub sources are not downloaded yet: see :func:`fetch`).
    Raises:
        InputError: neither a folder nor a Hub ID. HubAccessError: the Hub refused (not found, gated, bad token...).
        UnsafeFileError: the Hub lists a file name that would escape the download folder.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return Source(spec, role, path)
    if path.exists():
        raise InputError(f"{spec}: is a file; give the folder that holds the {role}")
    parsed = parse_hub_id(spec)
    if parsed is None or spec.startswith((".", "/", "~")):
        raise InputError(f"{spec}: {role} folder not found, and not a Hub ID (org/name[@revision]); check the path")
    repo_id, revision = parsed
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return _resolve_cached(spec, role, repo_id, revision, hub)
    with hub_errors(hub, repo_id, revision=revision):
        info = hub.api().model_info(repo_id, revision=revision, files_metadata=True)
    if not isinstance(info.sha, str) or not COMMIT_ID.fullmatch(info.sha):
        raise refuse(hub.url, f"an invalid commit id for {repo_id}")
    remote = {}
    for s in info.siblings or []:
        _check_name(repo_id, s.rfilename)
        remote[s.rfilename] = _remote_file(hub, repo_id, s)
    return Source(spec, role, None, repo_id, revision, info.sha, remote)


def _remote_file(hub: Hub, repo_id: str, sibling) -> RemoteFile:
    """A listed file's record, once its size and digests are shown to be what the Hub sends (they name cache files
    and decide what is downloaded)."""
    name, size, lfs = sibling.rfilename, sibling.size, sibling.lfs
    if type(size) is not int or not 0 <= size < 2**50:
        raise refuse(hub.url, f"an invalid size for {repo_id}/{name}")
    if sibling.blob_id is not None and not valid_digest(sibling.blob_id, (40,)):
        raise refuse(hub.url, f"an invalid blob id for {repo_id}/{name}")
    if lfs is not None and (not valid_digest(lfs.sha256, (64,)) or lfs.size != size):
        raise refuse(hub.url, f"an invalid LFS record (sha256 or size) for {repo_id}/{name}")
    return RemoteFile(size, lfs.sha256 if lfs else None, sibling.blob_id)


def repo_cache(hub: Hub, repo_id: str) -> Path:
    """The HF cache folder of a model repo (``models--org--name``)."""
    return hub.cache_root / f"models--{repo_id.replace('/', '--')}"


def _resolve_cached(spec: str, role: Role, repo_id: str, revision: str | None, hub: Hub) -> Source:
    """Resolve a Hub ID from the cache alone (HF_HUB_OFFLINE=1): a branch or tag through the cache's ``refs``, then
    the snapshot's files, each recorded by the blob it links to (named by the digest the Hub served it with)."""
    folder = repo_cache(hub, repo_id)
    rev = revision or "main"
    offline = f"{spec}: HF_HUB_OFFLINE=1 is set and the cache ({hub.cache_root}) holds no"
    if COMMIT_ID.fullmatch(rev):
        commit = rev
    else:
        if not _safe_revision(rev):
            raise InputError(f"{spec}: {rev!r} is not a branch, tag or commit name")
        ref = folder / "refs" / rev
        commit = ref.read_text(encoding="ascii", errors="replace")[:64].strip() if ref.is_file() else ""
        if not COMMIT_ID.fullmatch(commit):
            raise HubAccessError(f"{offline} {repo_id} at {rev}; unset HF_HUB_OFFLINE to download it")
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        raise HubAccessError(f"{offline} {repo_id} at {commit[:12]}; unset HF_HUB_OFFLINE to download it")
    blobs = (folder / "blobs").resolve()
    remote = {}
    for path in sorted(snapshot.rglob("*")):
        if path.is_dir():
            continue
        name = path.relative_to(snapshot).as_posix()
        _check_name(repo_id, name)
        blob = path.resolve()
        if blob.parent != blobs or not blob.is_file():
            raise UnsafeFileError(f"{path}: a cache entry that points outside the cache's blobs; remove it")
        digest = blob.name
        remote[name] = RemoteFile(
            blob.stat().st_size,
            digest if valid_digest(digest, (64,)) else None,
            digest if valid_digest(digest, (40,)) else None,
        )
    return Source(spec, role, None, repo_id, revision, commit, remote)


def _check_name(repo_id: str, name: str) -> None:
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or "\\" in name or ".." in parts or any(":" in p for p in parts):
        raise UnsafeFileError(
            f"{repo_id}: the Hub lists a file named {name!r}, which would land outside the "
            "download folder; refusing to download from this repository"
        )


def _first_layout(names: set[str], layouts: Iterable[tuple[str, ...]]) -> list[str]:
    for layout in layouts:
        found = [n for pattern in layout for n in sorted(names) if PurePosixPath(n).match(pattern) and "/" not in n]
        if found:
            return found
    return []


def needed_files(source: Source, *, weights: bool = True) -> list[str]:
    """The files of a Hub source the merge needs (only configs and tokenizer files when ``weights`` is False).

    Raises:
        InputError: the repository lacks the config or weights a LoRA adapter / a base model must have.
    """
    names = set(source.remote)
    needs, layouts = (ADAPTER_NEEDS, ADAPTER_WEIGHTS) if source.role == "adapter" else (BASE_NEEDS, BASE_WEIGHTS)
    chosen = [n for n in needs + COMMON if n in names]
    weight_files = _first_layout(names, layouts)
    if source.role == "adapter" and "adapter_config.json" not in names:
        raise InputError(f"{source.label}: no adapter_config.json in the repository; it is not a PEFT adapter")
    if not weight_files:
        what = "adapter_model.safetensors or .bin" if source.role == "adapter" else "model weights"
        raise InputError(f"{source.label}: no {what} in the repository; check the repository and revision")
    if weights:
        chosen += weight_files
    elif weight_files[0].endswith(".index.json"):
        chosen.append(weight_files[0])
    return chosen


def download_files(source: Source, hub: Hub) -> list[str]:
    """Every file a merge downloads from a Hub source: :func:`needed_files` and, for a sharded layout, the shards its
    index names (when the index is cached; else every file of the listing that looks like one of its shards)."""
    names = needed_files(source)
    index = next((n for n in names if n in SHARDS_OF_INDEX), None)
    if index is None:
        return names
    cached = _cached(source, index, hub)
    shards = None
    if cached is not None:
        try:
            shards = _index_shards(source, Path(cached))
        except InputError:
            pass  # a bad index is reported by fetch; for sizes, the listing serves
    if shards is None:
        shards = [n for n in sorted(source.remote) if "/" not in n and PurePosixPath(n).match(SHARDS_OF_INDEX[index])]
    return names + [s for s in shards if s not in names]


def _cached(source: Source, name: str, hub: Hub) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.repo_id or "", name, cache_dir=hub.cache_dir, revision=source.commit)
    return found if isinstance(found, str) else None


def not_cached(source: Source, hub: Hub, names: Iterable[str] | None = None) -> list[str]:
    """The files of a Hub source a merge downloads (or ``names``) that are not in the cache yet at its commit
    (nothing for local sources)."""
    if source.repo_id is None:
        return []
    todo = download_files(source, hub) if names is None else names
    return [n for n in todo if _cached(source, n, hub) is None]


def fetch(source: Source, hub: Hub, *, weights: bool = True, progress: Progress | None = None) -> Path:
    """Download what the merge needs from a Hub source into the HF cache (resuming partial downloads), verifying
    each file against the Hub's record; sets ``source.path`` and ``source.hashes``. Local sources are left as they
    are. A file that fails verification is deleted and downloaded once more; if it fails again, nothing uses it.

    Returns:
        the folder holding the source's files (``source.local``).
    Raises:
        HubAccessError, VerificationError, InputError.
    """
    if source.repo_id is None:
        return source.local
    progress = progress or Progress()
    for name in needed_files(source, weights=weights):
        path = _download_verified(source, name, hub, progress)
        source.path = path.parent
        if name.endswith(".index.json") and weights:
            for shard in [s for s in _index_shards(source, path) if s not in source.hashes]:
                _download_verified(source, shard, hub, progress)
    _remember_revision(source, hub)
    return source.local


def streamable_shards(source: Source) -> list[str]:
    """The weight files of a Hub base fetched without weights (its index is local) that can be planned from their
    index and downloaded one at a time: safetensors or torch ``.bin`` files, sorted by name; [] for Meta ``.pth``."""
    weights = _first_layout(set(source.remote), BASE_WEIGHTS)
    if weights in (["model.safetensors"], ["pytorch_model.bin"]):
        return weights
    if weights and weights[0] in SHARDS_OF_INDEX and source.path is not None:
        return _index_shards(source, source.path / weights[0])
    return []


def _remember_revision(source: Source, hub: Hub) -> None:
    """Record in the cache's ``refs`` which commit the branch or tag asked for resolved to (downloads pinned to the
    commit do not), so that an offline run resolves ``org/name[@revision]`` the same way."""
    rev = source.revision or "main"
    if COMMIT_ID.fullmatch(rev) or not _safe_revision(rev) or source.commit is None:
        return
    ref = repo_cache(hub, source.repo_id or "") / "refs" / rev
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(source.commit, encoding="ascii")


def _safe_revision(rev: str) -> bool:
    """A branch or tag name that stays inside the cache's ``refs`` folder as a path."""
    return not rev.startswith("/") and ".." not in rev.split("/") and "\\" not in rev


def _index_shards(source: Source, index: Path) -> list[str]:
    shards = sorted(set(index_weight_map(index).values()))
    for shard in shards:
        _check_name(source.repo_id or "", shard)
        if shard not in source.remote:
            raise InputError(f"{source.label}: {index.name} lists {shard}, which the repository does not have")
    return shards


def fetch_file(source: Source, name: str, hub: Hub, progress: Progress, *, verify: bool = True) -> Path:
    """Download one file of a Hub source into the cache and verify it as :func:`fetch` does; returns its path.
    With ``verify=False`` it is only downloaded (a later call verifies it, e.g. on another thread, while the next
    file downloads): nothing may read it before then.

    Raises:
        HubAccessError, VerificationError.
    """
    return _download_verified(source, name, hub, progress) if verify else _download(source, name, hub, progress)


def _download(source: Source, name: str, hub: Hub, progress: Progress, force: bool = False) -> Path:
    from huggingface_hub import hf_hub_download

    record = source.remote[name]
    with hub_errors(hub, source.repo_id or "", revision=source.revision, filename=name, expected=record.expected):
        return Path(
            hf_hub_download(
                source.repo_id or "",
                name,
                revision=source.commit,
                cache_dir=hub.cache_dir,
                token=hub.token,
                endpoint=hub.url,
                force_download=force,
                tqdm_class=progress.tqdm_class("download", name),
            )
        )


def _download_verified(source: Source, name: str, hub: Hub, progress: Progress) -> Path:
    for attempt in (1, 2):
        local = _download(source, name, hub, progress, force=attempt == 2)
        problem = mismatch(source, name, local, progress)
        if problem is None:
            return local
        _discard(local, repo_cache(hub, source.repo_id or ""))
        if attempt == 2:
            raise VerificationError(
                f"{source.label}/{name}: {problem} even after downloading it again; the copy "
                "on the Hub is damaged or altered: report it to the repository owner"
            )
    raise AssertionError("unreachable")


def mismatch(source: Source, name: str, local: Path, progress: Progress, *, sha256: str | None = None) -> str | None:
    """What is wrong with a downloaded file (None when it matches the Hub's record and the known-hash table);
    records its SHA256 in ``source.hashes``. ``sha256``: the file's digest when the caller hashed it as it arrived
    (not read again).

    Raises:
        VerificationError: a known published file whose SHA256 differs from the published one.
    """
    record = source.remote[name]
    size = local.stat().st_size
    if size != record.size:
        return f"size {size} differs from the Hub's {record.size}"
    # A big file read again to hash it gets a task of its own (a 10 GB shard takes a while)
    shown = bool(record.sha256) and sha256 is None and size >= _VERIFY_BAR_BYTES
    if record.sha256:
        if shown:
            with progress.task("verify", name, size) as update:
                digest = file_digest(local, progress=update)
        else:
            digest = sha256 or file_digest(local)
        if digest != record.sha256:
            return f"SHA256 {digest[:16]}... differs from the Hub's {record.sha256[:16]}..."
    else:
        if record.blob_id and git_blob_sha1(local) != record.blob_id:
            return f"git blob id differs from the Hub's {record.blob_id[:12]}..."
        digest = file_digest(local)
    check_known_file(source.repo_id, name, digest)
    source.hashes[name] = digest
    if not shown:  # checked without a task of its own: one event still says so
        progress.emit(ProgressEvent("verify", name, size, size, finished=True))
    return None


def _discard(local: Path, repo_cache: Path) -> None:
    """Remove a bad download from the cache: the snapshot link and the blob it points to, and only when both are
    where the client puts them inside ``repo_cache`` (a link to anywhere else is left alone)."""
    root = repo_cache.resolve()
    link, blob = local.parent.resolve() / local.name, local.resolve()
    if link.is_relative_to(root / "snapshots"):
        if blob != link and blob.parent == root / "blobs":
            blob.unlink(missing_ok=True)
        link.unlink(missing_ok=True)
