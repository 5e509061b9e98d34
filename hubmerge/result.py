"""What a merge or conversion produced, and the summary the CLI prints and the Space shows."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .inputs.sources import Source
from .output.staging import Written
from .plan import MergePlan, dtype_name
from .publish import PushResult
from .resources import peak_rss
from .sizes import format_size


@dataclass
class MergeResult:
    """What :func:`merge` produced. ``files`` maps each written file (relative to ``out``) to its SHA256."""

    out: Path
    folders: dict[str, Path]
    files: dict[str, str]
    plan: MergePlan
    seconds: float
    peak_rss: int  # bytes, whole process
    push: PushResult | None = None
    sources: list[Source] = field(default_factory=list)
    kept: int = 0  # files kept from an interrupted run
    notes: list[str] = field(default_factory=list)  # extra summary lines (a streamed push says what it did)

    @classmethod
    def finish(
        cls,
        out: Path,
        written: Written,
        plan: MergePlan,
        started: float,
        push: PushResult | None = None,
        sources: Sequence[Source] = (),
    ) -> MergeResult:
        """The result of a run that began at ``started`` (time.monotonic()) and wrote ``written``."""
        return cls(
            out,
            written.folders,
            written.files,
            plan,
            time.monotonic() - started,
            peak_rss(),
            push,
            list(sources),
            written.kept,
        )

    def summary(self) -> list[str]:
        """Lines for the end-of-run summary."""
        p = self.plan
        lines = [
            f"adapters applied: {', '.join(a.label for a in p.adapters)}"
            if p.adapters
            else f"converted: {p.base.path} (no adapters)"
        ]
        hub_sources = [s for s in self.sources if s.repo_id]
        if hub_sources:
            lines.append(
                f"from the Hub: {', '.join(s.label for s in hub_sources)}; "
                f"{sum(len(s.hashes) for s in hub_sources)} downloaded files verified against its SHA256"
            )
        lines.append(
            f"vocabulary: {p.vocab_size} tokens; tensors changed: {sum(t.changed for t in p.tensors)} "
            f"of {len(p.tensors)}; dtype {dtype_name(p.dtype)}"
        )
        lines += [f"warning: {w}" for w in p.warnings]
        for fmt, folder in self.folders.items():
            names = sorted(f for f in self.files if (self.out / f).parent == folder)
            lines.append(
                f"{fmt}: {folder} ({len(names)} files: {', '.join(Path(n).name for n in names[:4])}"
                f"{', ...' if len(names) > 4 else ''})"
            )
        if self.push:
            lines.append(
                f"published: {self.push.url} ({'private' if self.push.private else 'public'}, "
                f"{len(self.push.files)} files + model card)"
            )
        if self.kept:
            lines.append(f"resumed: kept {self.kept} files an interrupted run had finished")
        lines += self.notes
        lines.append(f"time: {self.seconds:.1f} s; peak memory: {format_size(self.peak_rss)}")
        return lines
