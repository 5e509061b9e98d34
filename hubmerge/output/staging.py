"""Staging: outputs are written into a hidden sibling folder and moved into place only once complete and hashed,
so a failed or interrupted run never leaves a half-written result where the user expects one.

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
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from ..verification.hashing import file_digest
from .recipe import build_recipe, hash_inputs, input_files, tool_versions, write_recipe
from .writers import Writer, make_writer

if TYPE_CHECKING:
    from ..inputs.loading import Inputs

JOURNAL_NAME = ".hubmerge-journal.json"


def fingerprint(plan: MergePlan, input_files: Iterable[Path], options: Mapping[str, Any]) -> str:
    """SHA256 of what decides the output bytes: the inputs' identity, the plan, the output options, the versions."""

    def stat(path: Path) -> list:
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


def check_output(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an ``out`` inside or around an input or the cache, and an existing one without ``overwrite``.

    Raises:
        OutputError: naming the folder and the fix.
    """
    for inp in inputs:
        inp = inp.resolve()
        if out == inp or inp in out.parents:
            raise OutputError(
                f"{out}: is inside {inp}, an input or the download cache, which hubmerge never "
                "modifies; choose an --out outside them"
            )
        if out in inp.parents:
            raise OutputError(
                f"{out}: contains {inp}, an input or the download cache; choose an --out that holds neither"
            )
    if out.exists() and not overwrite:
        raise OutputError(
            f"{out}: already exists; pass --overwrite to replace it, or choose another --out",
            path=out,
            remedy="overwrite",
        )


@dataclass
class Written:
    """What :func:`write_outputs` left in ``out``: the folder of each format, every file's SHA256 (relative path ->
    digest), and how many files it kept from an interrupted run of the same command."""

    folders: dict[str, Path]
    files: dict[str, str]
    kept: int = 0


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.hubmerge-old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)


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
) -> Written:
    """Write ``plan`` (a merge, or a conversion: a plan without adapters) in every format under ``out_dir``.

    Everything goes to a hidden sibling folder first; each file is hashed, the hubmerge.json recipe is written, and
    only then is the folder moved into place (replacing ``out_dir``). The inputs' SHA256 for the recipe are computed
    on the other core meanwhile. The sibling folder carries a journal of finished files: after a kill or Ctrl-C,
    the same command on the same inputs keeps them and writes only the rest.

    Raises:
        OutputError: no room (before writing, or the disk filled up meanwhile); any writer's IncompatibleError:
        the sibling folder is removed. Interrupted (Ctrl-C): the finished files are kept for a rerun.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_disk(out_dir.parent, plan.nbytes * len(formats) + 64 * 2**20)
    check_memory(estimate_memory(plan, block_bytes))
    staging = out_dir.with_name(f".{out_dir.name}{STAGING_SUFFIX}")
    options = {"formats": list(formats), "max_shard_size": max_shard_size, "pth_shards": pth_shards}
    journal = Journal(staging, fingerprint(plan, [p for files in input_files(plan) for p in files], options))
    writers: list[Writer] = []
    background = ThreadPoolExecutor(max_workers=1)
    pending = background.submit(hash_inputs, plan, inputs.sources)
    try:
        folders = {f: staging / f if len(formats) > 1 else staging for f in formats}
        for fmt in formats:  # each writer checks the plan fits its format before creating a file
            writers.append(make_writer(fmt, folders[fmt], plan, max_shard_size=max_shard_size, pth_shards=pth_shards))
        skip = set(range(len(plan.tensors)))
        for w in writers:  # a tensor is skipped only when no writer needs it any more
            skip &= w.resume(journal.done)
            w.on_file_done = journal.record
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
        _swap_into_place(staging, out_dir)
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
        background.shutdown(cancel_futures=True)
    return Written({f: out_dir / folders[f].relative_to(staging) for f in formats}, files, journal.kept)
