"""The whole flow behind ``hubmerge.merge``, stage by stage: resolve -> fetch -> verify -> plan -> merge -> write
(-> publish). Each stage lives in its own module; this one only orders them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from .constants import DEFAULT_FORMATS, DEFAULT_MAX_SHARD_SIZE, default_out_name
from .errors import InputError
from .inputs.hub import hub_from_args
from .inputs.loading import PathLike, open_inputs, resolve_inputs
from .merging import DEFAULT_BLOCK_BYTES
from .output.formats import check_formats
from .output.staging import check_output, write_outputs
from .plan import MergePlan, build_plan
from .progress import Progress, ProgressCallback
from .result import MergeResult
from .sizes import parse_size
from .stream import merge_push


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
    max_shard_size: str | int | None = None,
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
    keep_downloads: bool = True,
    work_dir: PathLike | None = None,
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
        max_shard_size: HF shard size limit, e.g. ``"5GB"`` (the default; with ``push_to``, a sixteenth of the model
            within 128 MB..2 GB). pth_shards: pth model-parallel shards (default by size).
        overwrite: replace an existing ``out``, and allow pushing into a repo that already has files.
        verify: check a Meta checkpoint base against its checklists and the known hashes first.
        push_to: publish the HF output to this Hub repo, private unless ``public``. Download, merge and upload then
            overlap (:mod:`hubmerge.stream`); without ``out``, only the shards in flight are ever on disk.
        keep_downloads: with ``push_to``, keep the base shards downloaded into the cache when the disk can hold
            them (false: remove each once merged; files cached before the run are never touched).
        work_dir: with ``push_to`` and no ``out``, where the shards in flight are written (default: the current
            folder); only they are ever on disk.
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
    hub = hub_from_args(token, cache_dir, endpoint)
    reporter = Progress(progress_callback, bars=progress)
    if push_to:  # the target is checked before any download: a push that cannot succeed fails now
        return merge_push(
            adapters,
            base,
            out,
            push_to=push_to,
            hub=hub,
            formats=formats,
            dtype=dtype,
            max_shard_size=max_shard_size,
            pth_shards=pth_shards,
            overwrite=overwrite,
            public=public,
            verify=verify,
            progress=reporter,
            block_bytes=block_bytes,
            keep_downloads=keep_downloads,
            work_dir=work_dir,
        )
    shard_limit = parse_size(max_shard_size if max_shard_size is not None else DEFAULT_MAX_SHARD_SIZE)
    base_src, adapter_srcs = resolve_inputs(adapters, base, hub)
    out_dir = Path(out if out is not None else default_out_name(adapter_srcs[-1].name)).expanduser().resolve()
    check_output(out_dir, [s.path for s in (base_src, *adapter_srcs) if s.path] + [hub.cache_root], overwrite)
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
    return MergeResult.finish(out_dir, written, plan, started, None, inputs.sources)
