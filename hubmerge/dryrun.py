"""The dry run: resolve every input and say what a merge would do, without downloading any weights.

Local inputs get the full plan (every shape check runs: headers are local). Hub inputs are judged from what is small
to fetch (configs, tokenizers) and from the Hub's file records: sizes to download, r/alpha/scaling, vocabulary
sizes and their order, tokenizer families by hash. Their tensor shapes are checked after download, before any output
is written.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .constants import DEFAULT_FORMATS, DEFAULT_MAX_SHARD_SIZE, default_out_name
from .errors import IncompatibleError
from .inputs.hub import Hub, hub_from_args
from .inputs.loading import PathLike, open_inputs, resolve_inputs
from .inputs.sources import Source, download_files, fetch, not_cached
from .model.adapters import config_layout, lora_scale, read_adapter_config
from .model.architectures import Architecture
from .model.base import read_config
from .model.tokenizer import read_tokenizer
from .plan import MergePlan, build_plan, dtype_name, parse_dtype, vocab_shrink_message
from .progress import Progress, ProgressCallback
from .publish import PushTarget, check_push_target
from .sizes import format_size, parse_size
from .stream import in_flight_folder, preview_disk
from .verification.known import check_tokenizer_matches


def estimate_nbytes(arch: Architecture, config: dict[str, Any], vocab: int, itemsize: int) -> int:
    """Weight bytes of a model of this family, config and vocabulary, from its shapes alone."""
    return sum(math.prod(shape) for shape in arch.tensor_shapes(config, vocab).values()) * itemsize


@dataclass
class PreviewInput:
    """One input of a previewed merge, in the order it applies (base first). Adapter fields are None for the base;
    ``download`` (bytes still to fetch) and ``files`` are None for a local folder."""

    role: str  # "base" or "adapter"
    source: str  # the repo ID, or the folder as given
    commit: str | None  # the commit a Hub input resolved to
    vocab: int | None  # rows of the embedding this input brings (the base's, or an adapter's replacement)
    r: int | None = None
    alpha: float | None = None
    scale: float | None = None
    layout: str | None = None
    download: int | None = None
    files: int | None = None


@dataclass
class Preview:
    """What :func:`plan_preview` found: the inputs in order, the output, warnings, and the CLI's text lines."""

    inputs: list[PreviewInput]
    dtype: str  # the output dtype's name, or "the base's dtype" when it is only known after download
    vocab: int
    formats: list[str]
    shards: int  # HF safetensors shards the output will have (about: from the estimated size)
    disk: int  # bytes the output needs
    free: int  # bytes free where it goes
    out: Path
    warnings: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    target: PushTarget | None = None  # with push_to: what the push will do to that repo, or why it cannot


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _download(src: Source, hub) -> tuple[str, int, int]:
    """The plan's words for what a Hub input still needs, the bytes to download and the files it uses."""
    names = download_files(src, hub)
    todo = not_cached(src, hub)
    size = sum(src.remote[n].size for n in todo)
    return (
        f"{_plural(len(names), 'file')}, {format_size(size)} to download ({len(names) - len(todo)} cached)",
        size,
        len(names),
    )


def preview(
    adapters: Sequence[PathLike],
    base: PathLike,
    *,
    out: PathLike | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    dtype: str | None = None,
    token: str | None = None,
    cache_dir: PathLike | None = None,
    endpoint: str | None = None,
    progress: bool = False,
    progress_callback: ProgressCallback | None = None,
    push_to: str | None = None,
    max_shard_size: str | int | None = None,
    keep_downloads: bool = True,
    overwrite: bool = False,
    public: bool = False,
    work_dir: PathLike | None = None,
) -> list[str]:
    """Describe the merge ``hubmerge.merge`` would run with these arguments, downloading no weights. With
    ``push_to``: what the push will do to that repo (checked first, as the merge does) and how it streams (peak
    disk, whether downloaded base shards stay in the cache).

    Returns:
        human-readable lines (the same the CLI's ``--dry-run`` prints); :func:`plan_preview` gives them as data.
    Raises:
        HubmergeError subclasses for anything already known to be wrong (missing repos, reversed order, a push
        target that would refuse the push...).
    """
    hub = hub_from_args(token, cache_dir, endpoint)
    target = check_push_target(push_to, hub, overwrite=overwrite, private=not public).require() if push_to else None
    return _preview(
        hub,
        adapters,
        base,
        target,
        out=out,
        formats=formats,
        dtype=dtype,
        progress=progress,
        progress_callback=progress_callback,
        max_shard_size=max_shard_size,
        keep_downloads=keep_downloads,
        work_dir=work_dir,
    ).lines


def plan_preview(
    adapters: Sequence[PathLike],
    base: PathLike,
    *,
    out: PathLike | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    dtype: str | None = None,
    token: str | None = None,
    cache_dir: PathLike | None = None,
    endpoint: str | None = None,
    progress: bool = False,
    progress_callback: ProgressCallback | None = None,
    push_to: str | None = None,
    max_shard_size: str | int | None = None,
    keep_downloads: bool = True,
    overwrite: bool = False,
    public: bool = False,
    work_dir: PathLike | None = None,
) -> Preview:
    """The dry run as data: every input in order (pinned commit, r, alpha, scale, vocabulary, download size) and the
    output (dtype, vocabulary, shards, disk), with the warnings and the text lines of :func:`preview`.

    Args:
        adapters, base, out, formats, dtype, token, cache_dir, endpoint, push_to, max_shard_size, keep_downloads,
            overwrite, public, work_dir: as for :func:`hubmerge.merge` (with ``push_to``, the disk figure is the streamed
            push's peak, and ``target`` says what the push would do to that repo: a refusal is reported, not raised).
        progress, progress_callback: download bars of configs and tokenizers; their progress events.
    Returns:
        a :class:`Preview`.
    Raises:
        HubmergeError subclasses for anything already known to be wrong (missing repos, reversed order...).
    """
    hub = hub_from_args(token, cache_dir, endpoint)
    target = check_push_target(push_to, hub, overwrite=overwrite, private=not public) if push_to else None
    return _preview(
        hub,
        adapters,
        base,
        target,
        out=out,
        formats=formats,
        dtype=dtype,
        progress=progress,
        progress_callback=progress_callback,
        max_shard_size=max_shard_size,
        keep_downloads=keep_downloads,
        work_dir=work_dir,
    )


def _preview(
    hub: Hub,
    adapters: Sequence[PathLike],
    base: PathLike,
    target: PushTarget | None,
    *,
    out: PathLike | None,
    formats: Sequence[str],
    dtype: str | None,
    progress: bool,
    progress_callback: ProgressCallback | None,
    max_shard_size: str | int | None,
    keep_downloads: bool,
    work_dir: PathLike | None,
) -> Preview:
    """The dry run for :func:`preview` and :func:`plan_preview`; ``target``: the push target's check (a push)."""
    base_src, adapter_srcs = resolve_inputs(adapters, base, hub)
    if target is not None and out is None and list(formats) == ["hf"]:  # a push keeping only the shards in flight
        out_dir = in_flight_folder(target.repo_id, work_dir)
    else:
        out_dir = Path(out if out is not None else default_out_name(adapter_srcs[-1].name)).expanduser().resolve()
    reporter = Progress(progress_callback, bars=progress)
    out_dtype = parse_dtype(dtype)
    if all(s.repo_id is None for s in (base_src, *adapter_srcs)):
        inputs = open_inputs(base_src, adapter_srcs, hub, progress=reporter)
        result = _full_preview(build_plan(inputs.base, inputs.adapters, dtype), base_src, adapter_srcs)
    else:
        for src in (base_src, *adapter_srcs):
            fetch(src, hub, weights=False, progress=reporter)
        result = _light_plan(base_src, adapter_srcs, out_dtype, hub)
    nbytes = result.disk
    result.formats, result.out, result.target = list(formats), out_dir, target
    if target is not None:  # a streamed push: what it does to the repo, its own disk plan (peak) and shard size
        keep_output = out is not None or list(formats) != ["hf"]
        disk, shard_limit, lines = preview_disk(
            base_src,
            adapter_srcs,
            hub,
            nbytes,
            max_shard_size=max_shard_size,
            keep_downloads=keep_downloads,
            out=out_dir,
            keep_output=keep_output,
        )
        result.lines += [*lines, f"push: {target.message}"]
        result.disk, result.free = disk.peak, shutil.disk_usage(_existing(hub.cache_root)).free
        result.shards = max(1, math.ceil(nbytes / shard_limit))
        return result
    need = nbytes * len(formats)
    free = shutil.disk_usage(_existing(out_dir)).free
    result.lines.append(
        f"write: {', '.join(formats)} to {out_dir}, about {format_size(need)} "
        f"({format_size(free)} free{'' if free >= need else ': NOT ENOUGH'})"
    )
    if free < need:
        result.warnings.append(f"{format_size(need)} of disk needed where the output goes, {format_size(free)} free")
    result.disk, result.free = need, free
    shard_limit = parse_size(max_shard_size if max_shard_size is not None else DEFAULT_MAX_SHARD_SIZE)
    result.shards = max(1, math.ceil(nbytes / shard_limit))
    return result


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (where a folder not yet made will be)."""
    return next(p for p in [path, *path.parents] if p.exists())


def _full_preview(plan: MergePlan, base_src: Source, adapter_srcs: Sequence[Source]) -> Preview:
    """The preview of a merge whose inputs are all local: the full plan, every shape checked."""
    rows = [PreviewInput("base", base_src.spec, None, plan.base.vocab_size)]
    for src, a in zip(adapter_srcs, plan.adapters):
        scales = sorted({round(p.scale, 6) for p in a.lora.values()})
        rows.append(
            PreviewInput(
                "adapter",
                src.spec,
                None,
                a.vocab_size,
                a.r,
                a.lora_alpha,
                scales[0] if len(scales) == 1 else None,
                a.layout,
            )
        )
    return Preview(
        rows,
        dtype_name(plan.dtype),
        plan.vocab_size,
        [],
        0,
        plan.nbytes,
        0,
        Path(),
        list(plan.warnings),
        plan.describe(),
    )


def _light_plan(base_src: Source, adapter_srcs: Sequence[Source], out_dtype, hub) -> Preview:
    config, arch = read_config(base_src.local)
    base_tok = read_tokenizer(base_src.local)
    vocab, owner = int(config.get("vocab_size") or (base_tok.size if base_tok else 0)), "the base"
    where, size, files = _download(base_src, hub) if base_src.repo_id else ("local", None, None)
    itemsize = (
        out_dtype.itemsize
        if out_dtype
        else {"float32": 4}.get(str(config.get("dtype") or config.get("torch_dtype")), 2)
    )
    rows = [PreviewInput("base", base_src.repo_id or base_src.spec, base_src.commit, vocab, download=size, files=files)]
    dims = arch.dims(config)
    lines = [
        f"base: {base_src.label} ({arch.name}, hidden {dims['hidden']}, {dims['layers']} layers, "
        f"vocab {vocab}); {where}"
    ]
    for i, src in enumerate(adapter_srcs, 1):
        cfg = read_adapter_config(src.local)
        tok = read_tokenizer(src.local)
        r, alpha = cfg.get("r", 8), float(cfg.get("lora_alpha", 8))
        scale = lora_scale(cfg, r, alpha)
        extends = "embed_tokens" in (cfg.get("modules_to_save") or [])
        extended = tok.size if (tok and extends) else None
        layout = config_layout(cfg)
        where, size, files = _download(src, hub) if src.repo_id else ("local", None, None)
        rows.append(
            PreviewInput("adapter", src.repo_id or src.spec, src.commit, extended, r, alpha, scale, layout, size, files)
        )
        lines.append(
            f"adapter {i}: {src.label} ({layout} layout) r={r} alpha={alpha:g} scale={scale:g}, targets "
            f"{cfg.get('target_modules')}, replaces {cfg.get('modules_to_save') or 'nothing'}"
            f"{f' -> vocab {extended}' if extended else ''}; {where}"
        )
        check_tokenizer_matches(src.label, src.repo_id, tok.sha256() if tok else None, extended)
        if extended is not None:
            if extended < vocab:
                raise IncompatibleError(vocab_shrink_message(src.label, extended, owner, vocab))
            vocab, owner = extended, f"adapter {src.label}"
    dtype = dtype_name(out_dtype) if out_dtype else "the base's dtype"
    lines.append(f"output: {dtype}, vocab {vocab}; tensor shapes are checked after download, before writing")
    if dtype == "the base's dtype":
        dtype = str(config.get("dtype") or config.get("torch_dtype") or dtype)
    nbytes = estimate_nbytes(arch, config, vocab, itemsize)
    return Preview(rows, dtype, vocab, [], 0, nbytes, 0, Path(), [], lines)
