"""Staging: outputs are written into a hidden sibling folder and moved into place only once complete and hashed,
so a failed or interrupted run never leaves a half-written result where the user expects one.

Where outputs may go: ``--out`` is never the working folder or one of its parents, the home folder (or a parent of
it), ``/``, an input or the download cache, nor inside or around an input or the cache. An existing ``--out`` is
replaced only with ``--overwrite``, and only when it is empty or holds nothing but what hubmerge wrote there: a
finished output (its ``hubmerge.json`` and exactly the files it lists) or hubmerge's own partial folder
(``.<out>.hubmerge-partial``, which holds a journal). Moving a new output into place removes only those files of the
old one.

Resuming an interrupted write:

The staging folder of a run (``.<out>.hubmerge-partial``) holds a journal: a fingerprint of everything that decides
the output bytes (inputs by path, size and modification time; the plan; the formats and their options; the versions
that shape the bytes) and each output file finished so far with its SHA256. A rerun of the same command on the same
inputs keeps the finished files whose bytes still match and writes only the rest, giving a byte-identical result;
any other run starts from an empty staging folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import STAGING_SUFFIX
from ..errors import Interrupted, OutputError
from ..merging import estimate_memory, merge_into
from ..plan import MergePlan, dtype_name
from ..progress import Progress
from ..resources import check_disk, check_memory
from ..sizes import format_size
from ..tensorio.output import HeldFiles
from ..verification.hashing import file_digest, submit
from .formats import format_folder
from .recipe import RECIPE_NAME, build_recipe, hash_inputs, input_files, tool_versions, write_recipe
from .writers import Writer, make_writer

if TYPE_CHECKING:
    from ..inputs.loading import Inputs

JOURNAL_NAME = ".hubmerge-journal.json"


def partial_folder(out: Path) -> Path:
    """The hidden sibling folder a run writes ``out`` into before moving it into place."""
    return out.with_name(f".{out.name}{STAGING_SUFFIX}")


def _listed_files(manifest: Path) -> set[str] | None:
    """The relative paths a hubmerge.json or a journal lists under ``files``; None when it is not one."""
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) for k in files):
        return None
    return set(files)


def _entries(folder: Path) -> Iterator[tuple[str, bool]]:
    """Every entry under ``folder`` as (relative POSIX path, is a real folder), parents before children; symbolic
    links are entries of their own, never followed."""
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        real_dirs = sorted(d for d in dirs if not (Path(root) / d).is_symlink())
        for name in sorted(dirs):
            yield (rel_root / name).as_posix(), name in real_dirs
        for name in sorted(files):
            yield (rel_root / name).as_posix(), False
        dirs[:] = real_dirs


def _foreign(folder: Path, rel: str, what: str = "") -> OutputError:
    return OutputError(
        f"{folder}: holds {rel}{what}, which hubmerge did not write; --overwrite replaces only an empty folder or a "
        "previous hubmerge output: move that away or choose another --out",
        path=folder / rel,
    )


def hubmerge_entries(folder: Path) -> list[str]:
    """What hubmerge may remove from ``folder`` (relative POSIX paths, parents first): everything in it, provided
    it is empty, a finished output (its hubmerge.json and only the files it lists, in real folders) or a partial
    folder of hubmerge's (named ``.<out>.hubmerge-partial`` with a journal in it).

    Raises:
        OutputError: naming the first entry hubmerge did not write (a symbolic link always counts as one).
    """
    partial = folder.name.startswith(".") and folder.name.endswith(STAGING_SUFFIX)
    listed: set[str] | None = None  # None: everything in the folder is hubmerge's
    if not (partial and (folder / JOURNAL_NAME).is_file() and not (folder / JOURNAL_NAME).is_symlink()):
        # (a partial folder's journal does not know the file being written when the run stopped: it is ours too)
        listed = _listed_files(folder / RECIPE_NAME) if (folder / RECIPE_NAME).is_file() else None
        listed = set() if listed is None else listed | {RECIPE_NAME}  # no readable recipe: only an empty folder
    parents = {p.as_posix() for rel in listed or () for p in Path(rel).parents}
    allowed = []
    for rel, is_dir in _entries(folder):  # stops at the first foreign entry, however big the folder
        if (folder / rel).is_symlink():
            raise _foreign(folder, rel, " (a symbolic link)")
        if listed is not None and rel not in (parents if is_dir else listed):
            raise _foreign(folder, rel)
        allowed.append(rel)
    return allowed


def check_output(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output folder that hubmerge must not write to or replace (see the module docstring).

    Args:
        out: the output folder (resolved here, so ``some/dir/..`` is judged as the folder it names).
        inputs: the input folders and the download cache.
        overwrite: whether an existing ``out`` may be replaced.

    Raises:
        OutputError: one line naming the folder, or the file in it that hubmerge did not write, and the fix.
    """
    out = Path(out).expanduser().resolve()
    protected = (
        (Path(out.anchor), "the root folder"),
        (Path.cwd().resolve(), "the working folder or one of its parents"),
        (Path.home().resolve(), "your home folder or one of its parents"),
    )
    for folder, what in protected:
        if out == folder or out in folder.parents:
            raise OutputError(
                f"{out}: is {what}, which hubmerge never replaces; choose a new folder for --out", path=out
            )
    for inp in inputs:
        inp = Path(inp).expanduser().resolve()
        if out == inp or inp in out.parents:
            raise OutputError(
                f"{out}: is inside {inp}, an input or the download cache, which hubmerge never "
                "modifies; choose an --out outside them",
                path=out,
            )
        if out in inp.parents:
            raise OutputError(
                f"{out}: contains {inp}, an input or the download cache; choose an --out that holds neither",
                path=out,
            )
    staging = partial_folder(out)
    if staging.exists() or staging.is_symlink():  # a run removes or resumes it: it must be hubmerge's own
        if not staging.is_dir() or staging.is_symlink():
            raise _foreign(out.parent, staging.name)
        hubmerge_entries(staging)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise OutputError(
            f"{out}: already exists; pass --overwrite to replace it, or choose another --out",
            path=out,
            remedy="overwrite",
        )
    if not out.is_dir():
        raise OutputError(f"{out}: is a file, not a folder hubmerge wrote; choose a folder for --out", path=out)
    hubmerge_entries(out)


def move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` folder to ``out``. An existing ``out`` is checked again, moved aside, and only
    the entries :func:`hubmerge_entries` allowed are removed from it; anything that appeared since stays where it
    is (in the moved-aside folder), so nothing of the user's is ever deleted.

    Raises:
        OutputError: ``out`` now holds something hubmerge did not write.
    """
    if not (out.exists() or out.is_symlink()):
        staging.rename(out)
        return
    if not out.is_dir():
        raise OutputError(f"{out}: is a file, not a folder hubmerge wrote; choose a folder for --out", path=out)
    allowed = hubmerge_entries(out)
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.hubmerge-old-", dir=out.parent))
    out.rename(aside)  # onto the empty folder mkdtemp made: a unique name, nothing else is touched
    staging.rename(out)
    for rel in reversed(allowed):  # children before their parents
        path = aside / rel
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        except OSError:  # not empty, or gone: leave it
            pass
    try:
        aside.rmdir()
    except OSError:  # something appeared meanwhile: it stays, aside
        pass


def fingerprint(plan: MergePlan, input_files: Iterable[Path], options: Mapping[str, Any]) -> str:
    """SHA256 of what decides the output bytes: the inputs' identity, the plan, the output options, the versions."""

    def stat(path: Path) -> list:
        if not path.exists():  # a Hub file still to download: its cache path names the commit, verified on arrival
            return [str(path)]
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]

    doc = {
        "inputs": [stat(p) for p in input_files],
        "dtype": dtype_name(plan.dtype),
        "config": plan.config,
        "tensors": [
            [t.name, list(t.shape), t.origin, [[x.adapter, x.pair.module, x.pair.scale] for x in t.terms]]
            for t in plan.tensors
        ],
        "options": dict(options),
        "tools": tool_versions(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


class Journal:
    """The finished files of a staging folder, kept across a crash (see the module docstring).

    Opening it verifies what a previous run recorded: files whose SHA256 still matches are kept (``done``); the
    staging folder is emptied of everything else.
    """

    def __init__(self, staging: Path, fingerprint: str):
        self.staging, self.fingerprint = staging, fingerprint
        self.path = staging / JOURNAL_NAME
        self.done: dict[Path, str] = {}
        previous = self._load()
        if previous is None:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        else:
            for rel, digest in previous.items():
                path = staging / rel
                if path.is_file() and file_digest(path) == digest:
                    self.done[path] = digest
            keep = set(self.done) | {self.path}
            for path in sorted(staging.rglob("*"), reverse=True):  # files first, then emptied folders
                if path.is_file() and path not in keep:
                    path.unlink()
        self.kept = len(self.done)  # files taken over from the interrupted run
        self._save()

    def _load(self) -> dict[str, str] | None:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("fingerprint") != self.fingerprint:
            return None
        files = doc.get("files")
        return files if isinstance(files, dict) else None

    def record(self, path: Path, digest: str) -> None:
        """Note a finished file (called once it is complete and synced to disk)."""
        self.done[Path(path)] = digest
        self._save()

    def _save(self) -> None:
        # write-then-rename: a crash leaves the old journal or the new one, never half of one
        tmp = self.path.with_suffix(".tmp")
        doc = {
            "fingerprint": self.fingerprint,
            "files": {p.relative_to(self.staging).as_posix(): d for p, d in self.done.items()},
        }
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def remove(self) -> None:
        """Drop the journal once the output is complete."""
        self.path.unlink(missing_ok=True)


@dataclass
class Written:
    """What :func:`write_outputs` left in ``out``: the folder of each format, every file's SHA256 (relative path ->
    digest), and how many files it kept from an interrupted run of the same command."""

    folders: dict[str, Path]
    files: dict[str, str]
    kept: int = 0


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _both(first: Callable[[Path, str], None], then: Callable[[Path, str], None]) -> Callable[[Path, str], None]:
    def call(path: Path, digest: str) -> None:
        first(path, digest)
        then(path, digest)

    return call


def write_outputs(
    plan: MergePlan,
    inputs: Inputs,
    out_dir: Path,
    formats: Sequence[str],
    *,
    max_shard_size: int,
    pth_shards: int | None,
    progress: Progress,
    block_bytes: int,
    disk_needed: int | None = None,
    on_file_done: Callable[[Path, str], None] | None = None,
    held: HeldFiles | None = None,
) -> Written:
    """Write ``plan`` (a merge, or a conversion: a plan without adapters) in every format under ``out_dir``.

    Everything goes to a hidden sibling folder first; each file is hashed, the hubmerge.json recipe is written, and
    only then is the folder moved into place (replacing ``out_dir``). The inputs' SHA256 for the recipe are computed
    on the other core meanwhile. The sibling folder carries a journal of finished files: after a kill or Ctrl-C,
    the same command on the same inputs keeps them and writes only the rest. ``on_file_done(path, sha256)`` is also
    called as each HF shard is finished (a streamed push uploads it); ``disk_needed`` replaces the room checked.
    ``held``: the HF shards are held in memory there instead of written to disk (up to its budget, on top of the
    merge's own memory), for ``on_file_done`` to take.

    Raises:
        OutputError: no room (before writing, or the disk filled up meanwhile); any writer's IncompatibleError:
        the sibling folder is removed. Interrupted (Ctrl-C): the finished files are kept for a rerun.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_disk(out_dir.parent, plan.nbytes * len(formats) + 64 * 2**20 if disk_needed is None else disk_needed)
    check_memory(estimate_memory(plan, block_bytes) + (held.budget if held is not None else 0))
    staging = partial_folder(out_dir)
    options = {"formats": list(formats), "max_shard_size": max_shard_size, "pth_shards": pth_shards}
    journal = Journal(staging, fingerprint(plan, [p for files in input_files(plan) for p in files], options))
    writers: list[Writer] = []
    # After the CLI's prehash jobs on the same thread (it waits for their results); inputs the hash cache knows cost
    # nothing here.
    pending = submit(hash_inputs, plan, inputs.sources, inputs=True)
    try:
        folders = {f: staging / format_folder(f) if len(formats) > 1 else staging for f in formats}
        for fmt in formats:  # each writer checks the plan fits its format before creating a file
            writers.append(
                make_writer(
                    fmt,
                    folders[fmt],
                    plan,
                    max_shard_size=max_shard_size,
                    pth_shards=pth_shards,
                    held=held if fmt == "hf" else None,
                )
            )
        skip = set(range(len(plan.tensors)))
        for fmt, w in zip(formats, writers):  # a tensor is skipped only when no writer needs it any more
            skip &= w.resume(journal.done)
            hf_hook = on_file_done if fmt == "hf" else None
            w.on_file_done = journal.record if hf_hook is None else _both(journal.record, hf_hook)
        done_bytes = sum(math.prod(plan.tensors[i].shape) * plan.out_dtype(plan.tensors[i]).itemsize for i in skip)
        with progress.task("merge", out_dir.name, plan.nbytes, initial=done_bytes) as update:
            merge_into(plan, writers, block_bytes, update, skip=skip)
        written = [p for w in writers for p in w.close()]
        format_info = {
            f: {"folder": folders[f].relative_to(staging).as_posix() or ".", **w.describe()}
            for f, w in zip(formats, writers)
        }
        hashed = {p: d for w in writers for p, d in w.digests().items()}  # while writing
        writers = []
        files = {p.relative_to(staging).as_posix(): hashed.get(p) or file_digest(p) for p in written}
        pending.result()
        write_recipe(staging, build_recipe(plan, inputs, format_info, files))
        journal.remove()
        move_into_place(staging, out_dir)
    except KeyboardInterrupt:
        for w in writers:
            w.abort()
        raise Interrupted(
            f"interrupted: {len(journal.done)} finished files are kept in {staging}; run the same "
            "command again to resume, or delete that folder"
        ) from None
    except BaseException as exc:
        for w in writers:
            w.abort()
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            free = shutil.disk_usage(out_dir.parent).free
            raise OutputError(
                f"{out_dir.parent}: the disk filled up while writing ({format_size(free)} free after "
                f"removing the partial output, {format_size(plan.nbytes * len(formats))} needed); "
                "free some space and run again"
            ) from None
        raise
    finally:
        if not pending.cancel():  # under way: let it end (it only reads), so no thread outlives the write
            pending.exception()
    return Written({f: out_dir / folders[f].relative_to(staging) for f in formats}, files, journal.kept)
