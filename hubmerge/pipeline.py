"""The whole flow behind ``hubmerge.merge``, stage by stage: resolve -> fetch -> verify -> plan -> merge -> write
(-> publish). Each stage lives in its own module; this one only orders them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .constants import DEFAULT_FORMATS, DEFAULT_MAX_SHARD_SIZE, default_out_name
from .errors import InputError
from .inputs.loading import PathLike, hub_from_args, open_inputs, resolve_inputs
from .inputs.sources import Source
from .merging import DEFAULT_BLOCK_BYTES
from .output.staging import Written, check_output, write_outputs
from .output.writers import check_formats
from .plan import MergePlan, build_plan, dtype_name
from .progress import Progress, ProgressCallback
from .publish import PushResult, push
from .resources import peak_rss
from .sizes import format_size, parse_size


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
        lines.append(f"time: {self.seconds:.1f} s; peak memory: {format_size(self.peak_rss)}")
        return lines


def plan_merge(
    adapters: Sequence[PathLike],
    base: PathLike,
    *,
    dtype: str | None = None,
    token: str | None = None,
    cache_dir: PathLike | None = None,
    endpoint: str | None = None,
    progress: bool = False,
    progress_callback: ProgressCallback | None = None,
) -> MergePlan:
    """Resolve, fetch and verify the inputs and plan the merge, writing no output.

    Returns:
        the checked :class:`~hubmerge.plan.MergePlan`.
    Raises:
        HubmergeError subclasses with a one-line message for any bad or incompatible input.
    """
    hub = hub_from_args(token, cache_dir, endpoint)
    reporter = Progress(progress_callback, bars=progress)
    inputs = open_inputs(*resolve_inputs(adapters, base, hub), hub, progress=reporter)
    return build_plan(inputs.base, inputs.adapters, dtype)


def merge(
    adapters: Sequence[PathLike],
    base: PathLike,
    out: PathLike | None = None,
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    dtype: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    pth_shards: int | None = None,
    overwrite: bool = False,
    push_to: str | None = None,
    public: bool = False,
    token: str | None = None,
    cache_dir: PathLike | None = None,
    endpoint: str | None = None,
    verify: bool = True,
    progress: bool = True,
    progress_callback: ProgressCallback | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> MergeResult:
    """Merge LoRA ``adapters`` (applied in order) into ``base`` and write the result under ``out``.

    Args:
        adapters: adapter folders or Hub IDs (``org/name[@revision]``), in the order they apply (Plus recipe:
            llama-plus, then alpaca-plus).
        base: the base model: an HF-format folder or Hub ID, or a Meta checkpoint folder (consolidated.*.pth,
            params.json), converted on the fly.
        out: output folder; default ``./<last adapter name>-merged``. With one format the files go straight into
            it; with several, into ``out/<format>/``. ``out/hubmerge.json`` records the merge.
        formats: any of ``"hf"`` (sharded safetensors + config + tokenizer), ``"pth"`` (Meta/llama.cpp layout) and
            ``"gguf"`` (one llama.cpp file, ``model-<f16|bf16|f32>.gguf``).
        dtype: output dtype (``float16``, ``bfloat16``, ``float32``); default: the base's.
        max_shard_size: HF shard size limit, e.g. ``"5GB"``. pth_shards: pth model-parallel shards (default by size).
        overwrite: replace an existing ``out``, and allow pushing into a repo that already has files.
        verify: check a Meta checkpoint base against its checklists and the known hashes first.
        push_to: publish the HF output to this Hub repo, private unless ``public``.
        token, cache_dir, endpoint: Hub access (default: HF_TOKEN or the saved login, the HF cache, HF_ENDPOINT).
        progress: show progress bars.
        progress_callback: called with a :class:`~hubmerge.progress.ProgressEvent` as each stage advances
            (download, verify, merge, upload), e.g. to drive a UI.
        block_bytes: the merge's working block size (memory is a few blocks).

    Returns:
        a :class:`MergeResult`.
    Raises:
        InputError, IncompatibleError, VerificationError, HubAccessError, OutputError (all HubmergeError): nothing is
        left at ``out`` in that case.
    """
    started = time.monotonic()
    formats = check_formats(formats)
    if push_to and "hf" not in formats:
        raise InputError("--push-to publishes the HF format: add hf to --format")
    shard_limit = parse_size(max_shard_size)
    hub = hub_from_args(token, cache_dir, endpoint)
    base_src, adapter_srcs = resolve_inputs(adapters, base, hub)
    out_dir = Path(out if out is not None else default_out_name(adapter_srcs[-1].name)).expanduser().resolve()
    check_output(out_dir, [s.path for s in (base_src, *adapter_srcs) if s.path] + [hub.cache_root], overwrite)
    reporter = Progress(progress_callback, bars=progress)
    inputs = open_inputs(base_src, adapter_srcs, hub, progress=reporter, verify=verify)
    plan = build_plan(inputs.base, inputs.adapters, dtype)
    written = write_outputs(
        plan,
        inputs,
        out_dir,
        formats,
        max_shard_size=shard_limit,
        pth_shards=pth_shards,
        progress=reporter,
        block_bytes=block_bytes,
    )
    pushed = None
    if push_to:
        pushed = push(
            out_dir, push_to, private=not public, overwrite=overwrite, hub=hub, verify=False, progress=reporter
        )
    return MergeResult.finish(out_dir, written, plan, started, pushed, inputs.sources)
