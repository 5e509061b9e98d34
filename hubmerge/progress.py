"""Typed progress events: one stream that the CLI's bars and the Space's panel both consume.

Every stage reports bytes through a :class:`Progress`: downloads (through the Hub client's own tqdm hook), the
SHA256 verification of big downloads, the merge (tensor bytes written) and uploads. A caller passes
``progress_callback`` to :func:`hubmerge.merge` / :func:`hubmerge.preview` to receive :class:`ProgressEvent` values;
``progress=True`` draws tqdm bars (the CLI). Neither reads the other's text: the Space never parses bar names.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from tqdm.auto import tqdm

Stage = Literal["download", "verify", "merge", "upload"]
STAGES: tuple[Stage, ...] = ("download", "verify", "merge", "upload")


@dataclass(frozen=True)
class ProgressEvent:
    """Where one task of a stage stands.

    Attributes:
        stage: ``download``, ``verify``, ``merge`` or ``upload``.
        name: what the task works on: a file name, or the output folder's name for the merge.
        done: units done so far (bytes).
        total: units in all, or None where unknown.
        unit: ``"B"``.
        finished: True on the task's last event.
    """

    stage: Stage
    name: str
    done: int
    total: int | None
    unit: str = "B"
    finished: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


class Progress:
    """Reports tasks to an optional callback and, when ``bars`` is true, as tqdm bars (bytes, the Hub client's units).

    Thread-safe: downloads and hashing may report from worker threads.
    """

    def __init__(self, callback: ProgressCallback | None = None, *, bars: bool = False) -> None:
        self.callback = callback
        self.bars = bars
        self._lock = threading.Lock()

    def emit(self, event: ProgressEvent) -> None:
        if self.callback is not None:
            with self._lock:
                self.callback(event)

    @contextmanager
    def task(self, stage: Stage, name: str, total: int | None, *, initial: int = 0) -> Iterator[Callable[[int], None]]:
        """A task of ``stage``: yields ``update(nbytes)``; the last event has ``finished=True``."""
        done = initial
        desc = name if stage == "merge" else f"{stage} {name}"
        bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                   disable=not self.bars)  # fmt: skip
        self.emit(ProgressEvent(stage, name, done, total))

        def update(n: int) -> None:
            nonlocal done
            done += n
            bar.update(n)
            self.emit(ProgressEvent(stage, name, done, total))

        try:
            yield update
        finally:
            bar.close()
        self.emit(ProgressEvent(stage, name, done, total, finished=True))

    def tqdm_class(self, stage: Stage, name: str) -> type[Any]:
        """A tqdm class for the Hub client's transfers (``hf_hub_download(tqdm_class=...)``) that reports to this
        Progress as ``stage`` of ``name`` (the client's own descriptions are cache paths, not file names)."""
        from huggingface_hub.utils import tqdm as hub_tqdm

        progress = self

        # The client's own tqdm class keeps its habits (no bars off a terminal, HF_HUB_DISABLE_PROGRESS_BARS).
        class _Reporting(hub_tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                if not progress.bars:
                    kwargs["disable"] = True
                kwargs["desc"] = f"{stage} {name}"
                super().__init__(*args, **kwargs)
                # a disabled tqdm neither counts nor keeps ``initial``: count here
                self._done = int(kwargs.get("initial") or 0)
                self._finished = False
                progress.emit(ProgressEvent(stage, name, self._done, self.total))

            def update(self, n: float | None = 1) -> bool | None:
                shown = super().update(n)
                self._done += int(n or 0)
                progress.emit(ProgressEvent(stage, name, self._done, self.total))
                return shown

            def close(self) -> None:
                if not self._finished:
                    self._finished = True
                    progress.emit(ProgressEvent(stage, name, self._done, self.total, finished=True))
                super().close()

        return _Reporting
