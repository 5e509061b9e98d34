"""HF format: sharded safetensors (+ index), config.json, generation_config.json and tokenizer files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from ...merging import Block
from ...plan import MergePlan
from ...tensorio import SafetensorsWriter
from ...tensorio.output import HeldFiles
from ...tensorio.source import Entry
from .base import Writer

INDEX_NAME = "model.safetensors.index.json"


def _json_dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class HFWriter(Writer):
    """Writes ``model.safetensors`` or ``model-0000k-of-0000N.safetensors`` shards of at most ``max_shard_size``
    bytes (a single larger tensor gets a shard of its own), in plan order, one shard open at a time. With ``held``
    the shards are held in memory there instead of written to disk (a streamed push uploads them from there)."""

    def __init__(self, folder: Path, plan: MergePlan, max_shard_size: int, *, held: HeldFiles | None = None):
        self.folder, self.plan, self.max_shard_size, self.held = Path(folder), plan, max_shard_size, held
        groups: list[list[int]] = [[]]
        size = 0
        for i, t in enumerate(plan.tensors):
            nbytes = Entry(t.name, plan.out_dtype(t), t.shape).nbytes
            if groups[-1] and size + nbytes > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += nbytes
        n = len(groups)
        self.shard_names = (
            ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )
        self._groups = groups
        self._shard_of = {i: k for k, g in enumerate(groups) for i in g}
        self._open: tuple[int, SafetensorsWriter] | None = None
        self._digests: dict[Path, str | None] = {}
        self._kept: set[int] = set()  # shards a resumed run keeps from the interrupted one
        self.on_file_done: Callable[[Path, str], None] | None = None
        self.folder.mkdir(parents=True, exist_ok=True)

    def resume(self, done: dict[Path, str]) -> set[int]:
        """Keep the shards an interrupted run finished (``done``: path -> SHA256); returns the tensor indices this
        writer no longer needs."""
        skip: set[int] = set()
        for k, name in enumerate(self.shard_names):
            path = self.folder / name
            if path in done:
                self._kept.add(k)
                self._digests[path] = done[path]
                skip.update(self._groups[k])
        return skip

    def _entries(self, k: int) -> list[Entry]:
        return [
            Entry(self.plan.tensors[i].name, self.plan.out_dtype(self.plan.tensors[i]), self.plan.tensors[i].shape)
            for i in self._groups[k]
        ]

    def write(self, block: Block) -> None:
        k = self._shard_of[block.index]
        if k in self._kept:  # another writer still needed this tensor
            return
        if self._open is None or self._open[0] != k:
            if self._open is not None:
                self._close_shard()
            self._open = (
                k,
                SafetensorsWriter(
                    self.folder / self.shard_names[k], self._entries(k), metadata={"format": "pt"}, held=self.held
                ),
            )
        self._open[1].write(block.data)
        if self._open[1].complete:  # closed (and handed to ``on_file_done``) now, not when the next shard begins
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._open is not None  # called only while a shard is open
        shard = self._open[1]
        self._open = None
        shard.close()
        self._digests[shard.path] = shard.sha256
        if self.on_file_done is not None and shard.sha256:
            self.on_file_done(shard.path, shard.sha256)

    def close(self) -> list[Path]:
        if self._open is not None:
            self._close_shard()
        files = [self.folder / name for name in self.shard_names]
        if len(self.shard_names) > 1:
            weight_map = {self.plan.tensors[i].name: self.shard_names[k] for k, g in enumerate(self._groups) for i in g}
            _json_dump(
                self.folder / INDEX_NAME, {"metadata": {"total_size": self.plan.nbytes}, "weight_map": weight_map}
            )
            files.append(self.folder / INDEX_NAME)
        _json_dump(self.folder / "config.json", self.plan.config)
        files.append(self.folder / "config.json")
        for src in self.plan.base.extra_files + self.plan.tokenizer_files():
            shutil.copyfile(src, self.folder / src.name)
            files.append(self.folder / src.name)
        for name, doc in self.plan.generated_files().items():
            _json_dump(self.folder / name, doc)
            files.append(self.folder / name)
        return files

    def describe(self) -> dict:
        return {"shards": len(self.shard_names), "max_shard_size": self.max_shard_size}

    def digests(self) -> dict[Path, str]:
        """SHA256 of the shards, computed while writing them (after close)."""
        return {p: d for p, d in self._digests.items() if d}

    def abort(self) -> None:
        if self._open is not None:
            self._open[1].abort()
            self._open = None
