"""The whole flow behind ``hubmerge.merge``: resolve -> fetch -> verify -> plan -> merge -> write (-> publish).

Outputs are written into a hidden sibling folder and moved into place only once complete and hashed, so a failed
or interrupted run never leaves a half-written result where the user expects one.
"""

from __future__ import annotations

import resource
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from .adapters import Adapter, open_adapter
from .base import BaseModel, open_base
from .errors import InputError, OutputError
from .merging import DEFAULT_BLOCK_BYTES, merge_into
from .plan import MergePlan, build_plan, dtype_name
from .recipe import tool_versions, write_recipe
from .sizes import format_size, parse_size
from .hub import Hub
from .publish import PushResult, push, source_license
from .sources import Source, fetch, needed_files, resolve
from .verify import check_tokenizer_matches, file_digest
from .write import FORMATS, Writer, make_writer

PathLike = str | Path


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

    def summary(self) -> list[str]:
        """Lines for the end-of-run summary."""
        p = self.plan
        lines = [f"adapters applied: {', '.join(a.label for a in p.adapters)}" if p.adapters
                 else f"converted: {p.base.path} (no adapters)"]
        hub_sources = [s for s in self.sources if s.repo_id]
        if hub_sources:
            lines.append(f"from the Hub: {', '.join(s.label for s in hub_sources)}; "
                         f"{sum(len(s.hashes) for s in hub_sources)} downloaded files verified against its SHA256")
        lines.append(f"vocabulary: {p.vocab_size} tokens; tensors changed: {sum(t.changed for t in p.tensors)} "
                     f"of {len(p.tensors)}; dtype {dtype_name(p.dtype)}")
        for fmt, folder in self.folders.items():
            names = sorted(f for f in self.files if (self.out / f).parent == folder)
            lines.append(f"{fmt}: {folder} ({len(names)} files: {', '.join(Path(n).name for n in names[:4])}"
                         f"{', ...' if len(names) > 4 else ''})")
        if self.push:
            lines.append(f"published: {self.push.url} ({'private' if self.push.private else 'public'}, "
                         f"{len(self.push.files)} files + model card)")
        lines.append(f"time: {self.seconds:.1f} s; peak memory: {format_size(self.peak_rss)}")
        return lines


@dataclass
class Inputs:
    """Resolved, fetched, verified and opened inputs (lazily: headers and configs only)."""

    base_source: Source
    base: BaseModel
    adapter_sources: list[Source]
    adapters: list[Adapter]

    @property
    def sources(self) -> list[Source]:
        return [self.base_source, *self.adapter_sources]


def _check_download_space(sources: Sequence[Source], hub: Hub) -> None:
    """Refuse before downloading when the cache's disk cannot hold what is still to download."""
    from huggingface_hub import constants, try_to_load_from_cache

    todo = 0
    for src in sources:
        if src.repo_id is None:
            continue
        for name in needed_files(src):
            if not isinstance(try_to_load_from_cache(src.repo_id, name, cache_dir=hub.cache_dir,
                                                     revision=src.commit), str):
                todo += src.remote[name].size
    if todo:
        cache = Path(hub.cache_dir or constants.HF_HUB_CACHE)
        cache.mkdir(parents=True, exist_ok=True)
        _check_disk(cache, todo, "the downloads")


def resolve_inputs(adapters: Sequence[PathLike], base: PathLike, hub: Hub) -> tuple[Source, list[Source]]:
    """Resolve the base and every adapter (local folders, or Hub repos pinned to a commit); nothing is downloaded.

    Raises:
        InputError, HubAccessError, UnsafeFileError.
    """
    if not adapters:
        raise InputError("no adapters given; name at least one LoRA adapter (folder or Hub ID)")
    return resolve(base, "base", hub), [resolve(a, "adapter", hub) for a in adapters]


def open_inputs(base_src: Source, adapter_srcs: Sequence[Source], hub: Hub, *, progress: bool = True,
                verify: bool = True) -> Inputs:
    """Download and verify what comes from the Hub (adapters first: they are small and fail fast), check tokenizers
    by hash, and open everything lazily. A Meta checkpoint base is verified by its checklists and the known-hash
    table (unless ``verify`` is false); the SHA256 computed for that are kept for the recipe.

    Raises:
        HubmergeError subclasses with a one-line message.
    """
    _check_download_space([*adapter_srcs, base_src], hub)
    for src in [*adapter_srcs, base_src]:
        fetch(src, hub, progress=progress)
    opened = [open_adapter(s.path, s.label) for s in adapter_srcs]
    for src, adapter in zip(adapter_srcs, opened):
        sha = adapter.tokenizer.sha256() if adapter.tokenizer else None
        check_tokenizer_matches(adapter.label, src.repo_id, sha, adapter.vocab_size)
    base_model = open_base(base_src.path, verify=verify)
    for name, digest in base_model.hashes.items():
        base_src.hashes.setdefault(name, digest)
    return Inputs(base_src, base_model, list(adapter_srcs), opened)


def plan_merge(adapters: Sequence[PathLike], base: PathLike, *, dtype: str | None = None, token: str | None = None,
               cache_dir: PathLike | None = None, endpoint: str | None = None, progress: bool = False) -> MergePlan:
    """Resolve, fetch and verify the inputs and plan the merge, writing no output.

    Returns:
        the checked :class:`~hubmerge.plan.MergePlan`.
    Raises:
        HubmergeError subclasses with a one-line message for any bad or incompatible input.
    """
    hub = hub_from_args(token, cache_dir, endpoint)
    inputs = open_inputs(*resolve_inputs(adapters, base, hub), hub, progress=progress)
    return build_plan(inputs.base, inputs.adapters, dtype)


def hub_from_args(token: str | None, cache_dir: PathLike | None, endpoint: str | None) -> Hub:
    return Hub(endpoint=endpoint, token=token, cache_dir=Path(cache_dir).expanduser() if cache_dir else None)


def _check_output(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    for inp in inputs:
        inp = inp.resolve()
        if out == inp or inp in out.parents:
            raise OutputError(f"{out}: is inside the input folder {inp}; choose an --out outside every input")
        if out in inp.parents:
            raise OutputError(f"{out}: contains the input {inp}; choose an --out that holds no input")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it, or choose another --out")


def _check_disk(folder: Path, needed: int, what: str = "the output") -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"{folder}: {format_size(free)} free but {what} need {format_size(needed)}; "
                          "free some space or choose another folder")


def _input_files(plan: MergePlan) -> list[list[Path]]:
    """The files each input contributes, base first: what the recipe hashes."""
    files = [list(plan.base.files)]
    for a in plan.adapters:
        files.append([a.weights, a.path / "adapter_config.json"] + (a.tokenizer.files if a.tokenizer else []))
    return files


def _hash_inputs(plan: MergePlan, sources: Sequence[Source]) -> None:
    """Fill in the SHA256 of every input file not already known (Hub downloads come verified with theirs)."""
    for src, files in zip(sources, _input_files(plan)):
        for path in files:
            if path.name not in src.hashes:
                src.hashes[path.name] = file_digest(path)


def _recipe(plan: MergePlan, inputs: Inputs, formats: dict, files: dict) -> dict:
    def source_record(src: Source, input_files: Sequence[Path]) -> dict:
        record = {"source": src.spec}
        if src.repo_id:
            record.update(repo_id=src.repo_id, revision=src.revision, commit=src.commit)
        record["files"] = {p.name: src.hashes[p.name] for p in input_files}
        record["license"] = source_license(src.path)
        return record

    input_files = _input_files(plan)
    adapters = []
    for src, a, files_in in zip(inputs.adapter_sources, plan.adapters, input_files[1:]):
        record = source_record(src, files_in)
        record.update(layout=a.layout, r=a.r, lora_alpha=a.lora_alpha, use_rslora=a.use_rslora,
                      scaling=sorted({round(p.scale, 8) for p in a.lora.values()}),
                      replaces=sorted(a.replacements), vocab_size=a.vocab_size)
        adapters.append(record)
    return {
        "base": source_record(inputs.base_source, input_files[0]),
        "adapters": adapters,
        "merge": {"dtype": dtype_name(plan.dtype), "vocab_size": plan.vocab_size,
                  "tokenizer": next((a.label for a in reversed(plan.adapters) if a.tokenizer is plan.tokenizer),
                                    "base"),
                  "tensors": len(plan.tensors), "changed": sum(t.changed for t in plan.tensors)},
        "formats": formats,
        "tools": tool_versions(),
        "files": files,
    }


def check_formats(formats: Sequence[str]) -> list[str]:
    """The requested output formats, deduplicated in order; InputError for an unknown or empty list."""
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InputError(f"unknown format {unknown or formats}; choose from {', '.join(FORMATS)}")
    return formats


def write_outputs(plan: MergePlan, out_dir: Path, formats: Sequence[str], *, max_shard_size: int,
                  pth_shards: int | None, progress: bool, block_bytes: int, recipe: Callable[[dict, dict], dict],
                  side_task: Callable[[], None] | None = None, desc: str = "merge") -> tuple[dict[str, Path],
                                                                                            dict[str, str]]:
    """Write ``plan`` (a merge, or a conversion: a plan without adapters) in every format under ``out_dir``.

    Everything goes to a hidden sibling folder first; each file is hashed, ``recipe(format_info, files)`` gives the
    hubmerge.json to write, and only then is the folder moved into place (replacing ``out_dir``). ``side_task``
    (hashing the inputs) runs on the other core meanwhile and must finish before the recipe is written.

    Returns:
        ``({format: folder}, {file relative to out_dir: sha256})``.
    Raises:
        OutputError: no room; any writer's IncompatibleError. Nothing is left behind on failure.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(out_dir.parent, plan.nbytes * len(formats) + 64 * 2**20)
    staging = out_dir.with_name(f".{out_dir.name}.hubmerge-partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    writers: list[Writer] = []
    background = ThreadPoolExecutor(max_workers=1)
    pending = background.submit(side_task) if side_task else None
    try:
        folders = {f: staging / f if len(formats) > 1 else staging for f in formats}
        for fmt in formats:  # each writer checks the plan fits its format before creating a file
            writers.append(make_writer(fmt, folders[fmt], plan, max_shard_size=max_shard_size, pth_shards=pth_shards))
        with tqdm(total=plan.nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                  disable=not progress) as bar:
            merge_into(plan, writers, block_bytes, bar.update)
        written = [p for w in writers for p in w.close()]
        format_info = {f: {"folder": folders[f].relative_to(staging).as_posix() or ".", **w.describe()}
                       for f, w in zip(formats, writers)}
        hashed = {p: d for w in writers for p, d in getattr(w, "digests", dict)().items()}  # while writing
        writers = []
        files = {p.relative_to(staging).as_posix(): hashed.get(p) or file_digest(p) for p in written}
        if pending is not None:
            pending.result()
        write_recipe(staging, recipe(format_info, files))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.hubmerge-old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            staging.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out_dir)
    except BaseException:
        for w in writers:
            w.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        background.shutdown(cancel_futures=True)
    return {f: out_dir / folders[f].relative_to(staging) for f in formats}, files


def merge(adapters: Sequence[PathLike], base: PathLike, out: PathLike | None = None, *,
          formats: Sequence[str] = ("hf",), dtype: str | None = None, max_shard_size: str | int = "5GB",
          pth_shards: int | None = None, overwrite: bool = False, push_to: str | None = None, public: bool = False,
          token: str | None = None, cache_dir: PathLike | None = None, endpoint: str | None = None,
          verify: bool = True, progress: bool = True, block_bytes: int = DEFAULT_BLOCK_BYTES) -> MergeResult:
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
    out_dir = Path(out if out is not None else f"{adapter_srcs[-1].name}-merged").expanduser().resolve()
    _check_output(out_dir, [s.path for s in (base_src, *adapter_srcs) if s.path] + [hub.cache_root], overwrite)
    inputs = open_inputs(base_src, adapter_srcs, hub, progress=progress, verify=verify)
    plan = build_plan(inputs.base, inputs.adapters, dtype)
    # Hashing the inputs reads them a second time: do it on the other core while the merge runs.
    result_folders, files = write_outputs(
        plan, out_dir, formats, max_shard_size=shard_limit, pth_shards=pth_shards, progress=progress,
        block_bytes=block_bytes, side_task=lambda: _hash_inputs(plan, inputs.sources),
        recipe=lambda format_info, files: _recipe(plan, inputs, format_info, files))
    pushed = push(out_dir, push_to, private=not public, overwrite=overwrite, hub=hub, verify=False) if push_to else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return MergeResult(out_dir, result_folders, files, plan, time.monotonic() - started, peak, pushed, inputs.sources)
