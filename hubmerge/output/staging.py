"""Resuming an interrupted write.

The staging folder of a run (``.<out>.hubmerge-partial``) holds a journal: a fingerprint of everything that decides
the output bytes (inputs by path, size and modification time; the plan; the formats and their options; the versions
that shape the bytes) and each output file finished so far with its SHA256. A rerun of the same command on the same
inputs keeps the finished files whose bytes still match and writes only the rest, giving a byte-identical result;
any other run starts from an empty staging folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..plan import MergePlan, dtype_name
from ..verification.hashing import file_digest
from .recipe import tool_versions

JOURNAL_NAME = ".hubmerge-journal.json"


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
