"""Execute a :class:`~hubmerge.plan.MergePlan`: yield every output tensor as blocks of rows, merged in fp32 and cast
once to the output dtype. Nothing larger than one block (plus one adapter's LoRA factors) is ever in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import CorruptFileError, IncompatibleError
from .plan import MergePlan, TensorPlan
from .tensorio.source import row_count

DEFAULT_BLOCK_BYTES = 64 * 1024 * 1024  # fp32 working size of one block: big enough for full-speed I/O


@dataclass
class Block:
    """Rows ``[start, start + len(data))`` of output tensor ``index`` (``name``), in the output dtype."""

    index: int
    name: str
    start: int
    data: torch.Tensor


def block_rows(shape: tuple[int, ...], align: int, block_bytes: int) -> int:
    """Rows per block: as many as fit ``block_bytes`` in fp32, rounded down to a multiple of ``align``
    (writers that permute rotary rows need whole heads), at least ``align``."""
    row_elems = 1
    for d in shape[1:]:
        row_elems *= d
    rows = max(align, block_bytes // (4 * max(row_elems, 1)) // align * align)
    return min(rows, max(row_count(shape), 1))


def _factors(plan: MergePlan, tensor: TensorPlan) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Load each term's factors in fp32 as (left, right, scale) with delta[rows] = scale * left[rows] @ right."""
    out = []
    for term in tensor.terms:
        pair = term.pair
        a, b = pair.A.read().float(), pair.B.read().float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise CorruptFileError(f"{plan.adapters[term.adapter].weights}: LoRA weights of {pair.module} contain "
                                   "NaN or Inf; the adapter is damaged, download or train it again")
        out.append((b, a, pair.scale) if pair.kind == "linear" else (a.t(), b.t(), pair.scale))
    return out


def merge_blocks(plan: MergePlan, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[Block]:
    """Yield the merged model, tensor after tensor in plan order, block after block.

    ``W = W0 + sum_i s_i * (B_i @ A_i)`` in fp32, cast once. Tensors with nothing to add are passed through (one
    cast at most).

    Raises:
        IncompatibleError: a merged value is NaN/Inf in the output dtype.
        CorruptFileError: an adapter tensor is NaN/Inf, or a file is truncated.
    """
    align = plan.base.head_dim
    for index, tensor in enumerate(plan.tensors):
        out_dtype = plan.out_dtype(tensor)
        factors = _factors(plan, tensor)
        rows = row_count(tensor.shape)
        step = block_rows(tensor.shape, align, block_bytes)
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            block = tensor.source.read(start, stop)
            if factors:
                work = block.to(torch.float32)
                for left, right, scale in factors:
                    work.addmm_(left[start:stop], right, alpha=scale)
                block = work.to(out_dtype)
            elif block.dtype != out_dtype:
                block = block.to(out_dtype)
            if tensor.changed and block.is_floating_point() and not torch.isfinite(block).all():
                origin = tensor.origin if not factors else ", ".join(
                    plan.adapters[t.adapter].label for t in tensor.terms)
                raise IncompatibleError(
                    f"{tensor.name}: the merge gives NaN/Inf in {str(out_dtype).removeprefix('torch.')} "
                    f"(from {origin}); the adapter is damaged or its values overflow: try --dtype bfloat16")
            yield Block(index, tensor.name, start, block)
