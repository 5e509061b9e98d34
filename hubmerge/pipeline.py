"""The whole flow behind ``hubmerge.merge``: resolve -> fetch -> verify -> plan -> merge -> write (-> publish).

Outputs are written into a hidden sibling folder and moved into place only once complete and hashed, so a failed
or interrupted run never leaves a half-written result where the user expects one.
"""

from __future__ import annotations

import resource
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from .adapters import Adapter, open_adapter
from .base import BaseModel, open_base
from .errors import InputError, OutputError
from .merging import DEFAULT_BLOCK_BYTES, merge_blocks
from .plan import MergePlan, build_plan, dtype_name
from .recipe import hash_files, tool_versions, write_recipe
from .sizes import format_size, parse_size
from .sources import Source, resolve_local
from .verify import file_digest
from .write import FORMATS, Writer
from .write.hf import HFWriter
from .write.meta import MetaWriter

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

    def summary(self) -> list[str]:
        """Lines for the end-of-run summary."""
        p = self.plan
        lines = [f"adapters applied: {', '.join(a.label for a in p.adapters)}",
                 f"vocabulary: {p.vocab_size} tokens; tensors changed: {sum(t.changed for t in p.tensors)} "
                 f"of {len(p.tensors)}; dtype {dtype_name(p.dtype)}"]
        for fmt, folder in self.folders.items():
            names = sorted(f for f in self.files if (self.out / f).parent == folder)
            lines.append(f"{fmt}: {folder} ({len(names)} files: {', '.join(Path(n).name for n in names[:4])}"
                         f"{', ...' if len(names) > 4 else ''})")
        lines.append(f"time: {self.seconds:.1f} s; peak memory: {format_size(self.peak_rss)}")
        return lines


def resolve(spec: PathLike, role: str) -> Source:
    """Turn a user-given adapter or base into a :class:`Source` (a local folder for now).

    Raises:
        InputError: nothing of that name exists.
    """
    source = resolve_local(spec)
    if source is None:
        raise InputError(f"{spec}: {role} folder not found; check the path")
    return source


def open_inputs(adapters: Sequence[PathLike], base: PathLike) -> tuple[Source, BaseModel, list[Source], list[Adapter]]:
    """Resolve and open the base and every adapter (lazily: headers and configs only)."""
    base_src = resolve(base, "base")
    adapter_srcs = [resolve(a, "adapter") for a in adapters]
    opened = [open_adapter(s.path, s.label) for s in adapter_srcs]
    return base_src, open_base(base_src.path), adapter_srcs, opened


def plan_merge(adapters: Sequence[PathLike], base: PathLike, *, dtype: str | None = None) -> MergePlan:
    """Resolve inputs and plan the merge without writing anything (the dry run).

    Returns:
        the checked :class:`~hubmerge.plan.MergePlan`.
    Raises:
        HubmergeError subclasses with a one-line message for any bad or incompatible input.
    """
    _, base_model, _, opened = open_inputs(adapters, base)
    return build_plan(base_model, opened, dtype)


def _check_output(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    for inp in inputs:
        inp = inp.resolve()
        if out == inp or inp in out.parents:
            raise OutputError(f"{out}: is inside the input folder {inp}; choose an --out outside every input")
        if out in inp.parents:
            raise OutputError(f"{out}: contains the input {inp}; choose an --out that holds no input")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it, or choose another --out")


def _check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"{folder}: {format_size(free)} free but the output needs {format_size(needed)}; "
                          "free some space or choose another --out")


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


def _recipe(plan: MergePlan, base_src: Source, adapter_srcs: Sequence[Source], formats: dict, files: dict) -> dict:
    def source_record(src: Source, input_files: Sequence[Path]) -> dict:
        record = {"source": src.spec}
        if src.repo_id:
            record.update(repo_id=src.repo_id, revision=src.revision, commit=src.commit)
        record["files"] = {p.name: src.hashes[p.name] for p in input_files}
        return record

    inputs = _input_files(plan)
    adapters = []
    for src, a, files_in in zip(adapter_srcs, plan.adapters, inputs[1:]):
        record = source_record(src, files_in)
        record.update(layout=a.layout, r=a.r, lora_alpha=a.lora_alpha, use_rslora=a.use_rslora,
                      scaling=sorted({round(p.scale, 8) for p in a.lora.values()}),
                      replaces=sorted(a.replacements), vocab_size=a.vocab_size)
        adapters.append(record)
    return {
        "base": source_record(base_src, inputs[0]),
        "adapters": adapters,
        "merge": {"dtype": dtype_name(plan.dtype), "vocab_size": plan.vocab_size,
                  "tokenizer": next((a.label for a in reversed(plan.adapters) if a.tokenizer is plan.tokenizer),
                                    "base"),
                  "tensors": len(plan.tensors), "changed": sum(t.changed for t in plan.tensors)},
        "formats": formats,
        "tools": tool_versions(),
        "files": files,
    }


def merge(adapters: Sequence[PathLike], base: PathLike, out: PathLike | None = None, *,
          formats: Sequence[str] = ("hf",), dtype: str | None = None, max_shard_size: str | int = "5GB",
          pth_shards: int | None = None, overwrite: bool = False, progress: bool = True,
          block_bytes: int = DEFAULT_BLOCK_BYTES) -> MergeResult:
    """Merge LoRA ``adapters`` (applied in order) into ``base`` and write the result under ``out``.

    Args:
        adapters: adapter folders (or Hub IDs), in the order they apply (Plus recipe: llama-plus, then alpaca-plus).
        base: the base model folder (HF format) or Hub ID.
        out: output folder; default ``./<last adapter name>-merged``. With one format the files go straight into
            it; with several, into ``out/<format>/``. ``out/hubmerge.json`` records the merge.
        formats: any of ``"hf"`` (sharded safetensors + config + tokenizer) and ``"pth"`` (Meta/llama.cpp layout).
        dtype: output dtype (``float16``, ``bfloat16``, ``float32``); default: the base's.
        max_shard_size: HF shard size limit, e.g. ``"5GB"``. pth_shards: pth model-parallel shards (default by size).
        overwrite: replace an existing ``out``. progress: show progress bars.

    Returns:
        a :class:`MergeResult`.
    Raises:
        InputError, IncompatibleError, OutputError (all HubmergeError): nothing is left at ``out`` in that case.
    """
    started = time.monotonic()
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InputError(f"unknown format {unknown or formats}; choose from {', '.join(FORMATS)}")
    shard_limit = parse_size(max_shard_size)
    base_src, base_model, adapter_srcs, opened = open_inputs(adapters, base)
    plan = build_plan(base_model, opened, dtype)
    out_dir = Path(out if out is not None else f"{adapter_srcs[-1].name}-merged").expanduser().resolve()
    _check_output(out_dir, [base_src.path] + [s.path for s in adapter_srcs], overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(out_dir.parent, plan.nbytes * len(formats) + 64 * 2**20)

    staging = out_dir.with_name(f".{out_dir.name}.hubmerge-partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    writers: list[Writer] = []
    # Hashing the inputs reads them a second time: do it on the other core while the merge runs.
    hasher = ThreadPoolExecutor(max_workers=1)
    input_hashes = hasher.submit(_hash_inputs, plan, [base_src, *adapter_srcs])
    try:
        folders = {f: staging / f if len(formats) > 1 else staging for f in formats}
        for fmt in formats:  # each writer checks the plan fits its format before creating a file
            writers.append(HFWriter(folders[fmt], plan, shard_limit) if fmt == "hf"
                           else MetaWriter(folders[fmt], plan, pth_shards))
        with tqdm(total=plan.nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
                  disable=not progress) as bar:
            for block in merge_blocks(plan, block_bytes):
                for w in writers:
                    w.write(block)
                bar.update(block.data.numel() * block.data.element_size())
        written = [p for w in writers for p in w.close()]
        format_info = {f: {"folder": folders[f].relative_to(staging).as_posix() or ".", **w.describe()}
                       for f, w in zip(formats, writers)}
        writers = []
        files = hash_files(written, staging)
        input_hashes.result()
        write_recipe(staging, _recipe(plan, base_src, adapter_srcs, format_info, files))
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
        hasher.shutdown(cancel_futures=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result_folders = {f: out_dir / folders[f].relative_to(staging) for f in formats}
    return MergeResult(out_dir, result_folders, files, plan, time.monotonic() - started, peak)
