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
from pathlib import Path
from typing import Any

from .constants import DEFAULT_FORMATS, default_out_name
from .errors import IncompatibleError
from .inputs.loading import PathLike, hub_from_args, open_inputs, resolve_inputs
from .inputs.sources import Source, download_files, fetch, not_cached
from .model.adapters import config_layout, lora_scale, read_adapter_config
from .model.architectures import Architecture
from .model.base import read_config
from .model.tokenizer import read_tokenizer
from .plan import build_plan, dtype_name, parse_dtype, vocab_shrink_message
from .progress import Progress, ProgressCallback
from .publish import check_push_target
from .sizes import format_size
from .stream import preview_lines
from .verification.known import check_tokenizer_matches


def estimate_nbytes(arch: Architecture, config: dict[str, Any], vocab: int, itemsize: int) -> int:
    """Weight bytes of a model of this family, config and vocabulary, from its shapes alone."""
    return sum(math.prod(shape) for shape in arch.tensor_shapes(config, vocab).values()) * itemsize


def _download_line(src: Source, hub) -> str:
    names = download_files(src, hub)
    todo = not_cached(src, hub)
    size = sum(src.remote[n].size for n in todo)
    return f"{len(names)} files, {format_size(size)} to download ({len(names) - len(todo)} cached)"


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
) -> list[str]:
    """Describe the merge ``hubmerge.merge`` would run with these arguments, downloading no weights. With
    ``push_to``: what the push will do to that repo (checked first, as the merge does) and how it streams (peak
    disk, whether downloaded base shards stay in the cache).

    Returns:
        human-readable lines (the same the CLI's ``--dry-run`` and the Space's Check step show).
    Raises:
        HubmergeError subclasses for anything already known to be wrong (missing repos, reversed order...).
    """
    hub = hub_from_args(token, cache_dir, endpoint)
    target = check_push_target(push_to, hub, overwrite=overwrite, private=not public).require() if push_to else None
    base_src, adapter_srcs = resolve_inputs(adapters, base, hub)
    out_dir = Path(out if out is not None else default_out_name(adapter_srcs[-1].name)).expanduser().resolve()
    reporter = Progress(progress_callback, bars=progress)
    out_dtype = parse_dtype(dtype)
    if all(s.repo_id is None for s in (base_src, *adapter_srcs)):
        inputs = open_inputs(base_src, adapter_srcs, hub, progress=reporter)
        plan = build_plan(inputs.base, inputs.adapters, dtype)
        nbytes = plan.nbytes
        lines = plan.describe()
    else:
        for src in (base_src, *adapter_srcs):
            fetch(src, hub, weights=False, progress=reporter)
        lines, nbytes = _light_plan(base_src, adapter_srcs, out_dtype, hub)
    if target is not None:
        keep_output = out is not None or list(formats) != ["hf"]
        lines += preview_lines(
            base_src,
            adapter_srcs,
            hub,
            nbytes,
            max_shard_size=max_shard_size,
            keep_downloads=keep_downloads,
            out=out_dir,
            keep_output=keep_output,
        )
        lines.append(f"push: {target.message}")
        return lines
    need = nbytes * len(formats)
    free = shutil.disk_usage(next(p for p in [out_dir, *out_dir.parents] if p.exists())).free
    lines.append(
        f"write: {', '.join(formats)} to {out_dir}, about {format_size(need)} "
        f"({format_size(free)} free{'' if free >= need else ': NOT ENOUGH'})"
    )
    return lines


def _light_plan(base_src: Source, adapter_srcs: Sequence[Source], out_dtype, hub) -> tuple[list[str], int]:
    config, arch = read_config(base_src.local)
    base_tok = read_tokenizer(base_src.local)
    vocab, owner = int(config.get("vocab_size") or (base_tok.size if base_tok else 0)), "the base"
    where = _download_line(base_src, hub) if base_src.repo_id else "local"
    itemsize = (
        out_dtype.itemsize
        if out_dtype
        else {"float32": 4}.get(str(config.get("dtype") or config.get("torch_dtype")), 2)
    )
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
        rows = tok.size if (tok and extends) else None
        layout = config_layout(cfg)
        where = _download_line(src, hub) if src.repo_id else "local"
        lines.append(
            f"adapter {i}: {src.label} ({layout} layout) r={r} alpha={alpha:g} scale={scale:g}, targets "
            f"{cfg.get('target_modules')}, replaces {cfg.get('modules_to_save') or 'nothing'}"
            f"{f' -> vocab {rows}' if rows else ''}; {where}"
        )
        check_tokenizer_matches(src.label, src.repo_id, tok.sha256() if tok else None, rows)
        if rows is not None:
            if rows < vocab:
                raise IncompatibleError(vocab_shrink_message(src.label, rows, owner, vocab))
            vocab, owner = rows, f"adapter {src.label}"
    dtype = dtype_name(out_dtype) if out_dtype else "the base's dtype"
    lines.append(f"output: {dtype}, vocab {vocab}; tensor shapes are checked after download, before writing")
    return lines, estimate_nbytes(arch, config, vocab, itemsize)
