"""``hubmerge convert``: a base written in other formats with no adapter applied. Above all the original Meta
release (consolidated.*.pth, params.json, tokenizer.model) to HF safetensors, verified first and streamed shard by
shard; also to GGUF, or an HF folder to pth / GGUF.

A conversion is a plan without adapters, so it runs through the merge's own pieces: the writers, the staging folder
moved into place when complete, the output hashes and the hubmerge.json recipe.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from .constants import DEFAULT_FORMATS, DEFAULT_MAX_SHARD_SIZE
from .errors import InputError
from .inputs.loading import Inputs, PathLike
from .inputs.sources import Source
from .merging import DEFAULT_BLOCK_BYTES
from .model.loader import open_base
from .output.formats import check_formats
from .output.staging import check_output, write_outputs
from .plan import build_plan
from .progress import Progress, ProgressCallback
from .result import MergeResult
from .sizes import parse_size


def convert(
    source: PathLike,
    out: PathLike,
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    dtype: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    pth_shards: int | None = None,
    verify: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    progress_callback: ProgressCallback | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> MergeResult:
    """Convert the model in the folder ``source`` (a Meta checkpoint, or an HF folder) and write it under ``out``.

    Args:
        source: a Meta checkpoint folder (``consolidated.NN.pth`` shards, ``params.json``, ``tokenizer.model`` in
            it or its parent) or an HF-format folder of a supported family.
        out: output folder (with several formats, each goes to ``out/<format>/``).
        formats: ``"hf"`` (default), ``"pth"``, ``"gguf"``.
        dtype: output dtype; default: the checkpoint's (fp16 for the original release).
        max_shard_size, pth_shards: as for :func:`hubmerge.merge`.
        verify: check ``checklist.chk`` / ``tokenizer_checklist.chk`` and the known SHA256 of the original release
            before converting (Meta checkpoints).
        overwrite: replace an existing ``out``. progress: show a progress bar. progress_callback: as for
            :func:`hubmerge.merge`.

    Returns:
        a :class:`~hubmerge.pipeline.MergeResult` (its plan has no adapters).
    Raises:
        InputError, CorruptFileError, VerificationError, IncompatibleError, OutputError: nothing is left at ``out``.
    """
    started = time.monotonic()
    formats = check_formats(formats)
    shard_limit = parse_size(max_shard_size)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise InputError(f"{source}: folder not found; give the folder holding consolidated.*.pth and params.json")
    out_dir = Path(out).expanduser().resolve()
    check_output(out_dir, [folder], overwrite)
    base = open_base(folder, verify=verify)
    src = Source(str(source), "base", folder, hashes=dict(base.hashes))
    plan = build_plan(base, [], dtype, conversion=True)
    inputs = Inputs(src, base, [], [])
    written = write_outputs(
        plan,
        inputs,
        out_dir,
        formats,
        max_shard_size=shard_limit,
        pth_shards=pth_shards,
        progress=Progress(progress_callback, bars=progress),
        block_bytes=block_bytes,
    )
    return MergeResult.finish(out_dir, written, plan, started)
