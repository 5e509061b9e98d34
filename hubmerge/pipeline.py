"""The whole flow behind ``hubmerge.merge``: resolve -> fetch -> verify -> plan -> merge -> write (-> publish).

Outputs are written into a hidden sibling folder and moved into place only once complete and hashed, so a failed
or interrupted run never leaves a half-written result where the user expects one.
"""

from __future__ import annotations

import errno
import math
import resource
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .errors import InputError, Interrupted, OutputError
from .inputs.hub import Hub
from .inputs.sources import Source, fetch, not_cached, resolve
from .merging import DEFAULT_BLOCK_BYTES, estimate_memory, merge_into
from .model.adapters import Adapter, open_adapter
from .model.base import BaseModel, open_base
from .output.recipe import tool_versions, write_recipe
from .output.staging import Journal, fingerprint
from .output.writers import FORMATS, Writer, make_writer
from .plan import MergePlan, build_plan, dtype_name
from .publish import PushResult, push, source_license
from .sizes import format_size, parse_size
from .verification.hashing import file_digest
from .verification.known import check_tokenizer_matches

PathLike = str | Path


def _proc_bytes(path: str, key: str) -> int | None:
    """A ``key: N kB`` value of a Linux /proc file, in bytes; None where there is no such file or key."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident memory of this process, in bytes.

    VmHWM of /proc/self/status where there is one: ru_maxrss survives exec, so a process started from a big parent
    (a test runner, a notebook) would report the parent's peak as its own.
    """
    peak = _proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
    todo = sum(src.remote[name].size for src in sources for name in not_cached(src, hub))
    if todo:
        hub.cache_root.mkdir(parents=True, exist_ok=True)
        _check_disk(hub.cache_root, todo, "the downloads")


def resolve_inputs(adapters: Sequence[PathLike], base: PathLike, hub: Hub) -> tuple[Source, list[Source]]:
    """Resolve the base and every adapter (local folders, or Hub repos pinned to a commit); nothing is downloaded.

    Raises:
        InputError, HubAccessError, UnsafeFileError.
    """
    if not adapters:
        raise InputError("no adapters given; name at least one LoRA adapter (folder or Hub ID)")
    return resolve(base, "base", hub), [resolve(a, "adapter", hub) for a in adapters]


def open_inputs(
    base_src: Source, adapter_srcs: Sequence[Source], hub: Hub, *, progress: bool = True, verify: bool = True
) -> Inputs:
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


def plan_merge(
    adapters: Sequence[PathLike],
    base: PathLike,
    *,
    dtype: str | None = None,
    token: str | None = None,
    cache_dir: PathLike | None = None,
    endpoint: str | None = None,
    progress: bool = False,
) -> MergePlan:
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


def check_output(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
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
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it, or choose another --out")


def _check_disk(folder: Path, needed: int, what: str = "the output") -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(
            f"{folder}: {format_size(free)} free but {what} need {format_size(needed)}; "
            "free some space or choose another folder"
        )


def available_memory() -> int | None:
    """Bytes of memory the kernel says a new allocation can get (MemAvailable), or None where unknown."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def _check_memory(needed: int) -> None:
    available = available_memory()
    if available is not None and available < needed:
        raise OutputError(
            f"the merge needs about {format_size(needed)} of memory but {format_size(available)} is "
            "available; close other programs and run again"
        )


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
        record.update(
            layout=a.layout,
            r=a.r,
            lora_alpha=a.lora_alpha,
            use_rslora=a.use_rslora,
            scaling=sorted({round(p.scale, 8) for p in a.lora.values()}),
            replaces=sorted(a.replacements),
            vocab_size=a.vocab_size,
        )
        adapters.append(record)
    return {
        "base": source_record(inputs.base_source, input_files[0]),
        "adapters": adapters,
        "merge": {
            "dtype": dtype_name(plan.dtype),
            "vocab_size": plan.vocab_size,
            "tokenizer": next((a.label for a in reversed(plan.adapters) if a.tokenizer is plan.tokenizer), "base"),
            "tensors": len(plan.tensors),
            "changed": sum(t.changed for t in plan.tensors),
        },
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


@dataclass
class Written:
    """What :func:`write_outputs` left in ``out``: the folder of each format, every file's SHA256 (relative path ->
    digest), and how many files it kept from an interrupted run of the same command."""

    folders: dict[str, Path]
    files: dict[str, str]
    kept: int = 0


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_outputs(
    plan: MergePlan,
    inputs: Inputs,
    out_dir: Path,
    formats: Sequence[str],
    *,
    max_shard_size: int,
    pth_shards: int | None,
    progress: bool,
    block_bytes: int,
    desc: str = "merge",
) -> Written:
    """Write ``plan`` (a merge, or a conversion: a plan without adapters) in every format under ``out_dir``.

    Everything goes to a hidden sibling folder first; each file is hashed, the hubmerge.json recipe is written, and
    only then is the folder moved into place (replacing ``out_dir``). The inputs' SHA256 for the recipe are computed
    on the other core meanwhile.

    The sibling folder carries a journal of finished files (:mod:`hubmerge.output.staging`): after a kill or Ctrl-C, the
    same command on the same inputs keeps them and writes only the rest.

    Raises:
        OutputError: no room (before writing, or the disk filled up meanwhile); any writer's IncompatibleError:
        the sibling folder is removed. Interrupted (Ctrl-C): the finished files are kept for a rerun.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(out_dir.parent, plan.nbytes * len(formats) + 64 * 2**20)
    _check_memory(estimate_memory(plan, block_bytes))
    staging = out_dir.with_name(f".{out_dir.name}.hubmerge-partial")
    options = {"formats": list(formats), "max_shard_size": max_shard_size, "pth_shards": pth_shards}
    journal = Journal(staging, fingerprint(plan, [p for files in _input_files(plan) for p in files], options))
    writers: list[Writer] = []
    background = ThreadPoolExecutor(max_workers=1)
    pending = background.submit(_hash_inputs, plan, inputs.sources)
    try:
        folders = {f: staging / f if len(formats) > 1 else staging for f in formats}
        for fmt in formats:  # each writer checks the plan fits its format before creating a file
            writers.append(make_writer(fmt, folders[fmt], plan, max_shard_size=max_shard_size, pth_shards=pth_shards))
        skip = set(range(len(plan.tensors)))
        for w in writers:  # a tensor is skipped only when no writer needs it any more
            skip &= w.resume(journal.done) if hasattr(w, "resume") else set()
            if hasattr(w, "on_file_done"):
                w.on_file_done = journal.record
        done_bytes = sum(math.prod(plan.tensors[i].shape) * plan.out_dtype(plan.tensors[i]).itemsize for i in skip)
        with tqdm(
            total=plan.nbytes,
            initial=done_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=not progress,
        ) as bar:
            merge_into(plan, writers, block_bytes, bar.update, skip=skip)
        written = [p for w in writers for p in w.close()]
        format_info = {
            f: {"folder": folders[f].relative_to(staging).as_posix() or ".", **w.describe()}
            for f, w in zip(formats, writers)
        }
        hashed = {p: d for w in writers for p, d in getattr(w, "digests", dict)().items()}  # while writing
        writers = []
        files = {p.relative_to(staging).as_posix(): hashed.get(p) or file_digest(p) for p in written}
        pending.result()
        write_recipe(staging, _recipe(plan, inputs, format_info, files))
        journal.remove()
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.hubmerge-old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            staging.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out_dir)
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


def merge(
    adapters: Sequence[PathLike],
    base: PathLike,
    out: PathLike | None = None,
    *,
    formats: Sequence[str] = ("hf",),
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    pth_shards: int | None = None,
    overwrite: bool = False,
    push_to: str | None = None,
    public: bool = False,
    token: str | None = None,
    cache_dir: PathLike | None = None,
    endpoint: str | None = None,
    verify: bool = True,
    progress: bool = True,
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
    check_output(out_dir, [s.path for s in (base_src, *adapter_srcs) if s.path] + [hub.cache_root], overwrite)
    inputs = open_inputs(base_src, adapter_srcs, hub, progress=progress, verify=verify)
    plan = build_plan(inputs.base, inputs.adapters, dtype)
    # Hashing the inputs reads them a second time: do it on the other core while the merge runs.
    written = write_outputs(
        plan,
        inputs,
        out_dir,
        formats,
        max_shard_size=shard_limit,
        pth_shards=pth_shards,
        progress=progress,
        block_bytes=block_bytes,
    )
    pushed = push(out_dir, push_to, private=not public, overwrite=overwrite, hub=hub, verify=False) if push_to else None
    return MergeResult.finish(out_dir, written, plan, started, pushed, inputs.sources)
