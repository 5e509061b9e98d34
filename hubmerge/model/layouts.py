"""Name templates and layouts: the only code that interprets ``{i}`` (the layer index) in the tensor tables of
:mod:`hubmerge.model.architectures`, Meta's feed-forward size formula, and the rotary row permutation between HF's
layout and Meta's (which llama.cpp's llama arch shares).
"""

from __future__ import annotations

import re

import torch

# The original LLaMA shards hold Meta's precomputed rotary frequencies, which no loader wants.
META_DROPPED = ("rope.freqs",)

_PATTERNS: dict[str, re.Pattern[str]] = {}


def match(name: str, templates) -> tuple[str, int | None] | None:
    """Find the template (from ``templates``) that ``name`` instantiates; returns ``(template, layer)`` or None."""
    for template in templates:
        pattern = _PATTERNS.get(template)
        if pattern is None:
            pattern = _PATTERNS[template] = re.compile(
                "^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$"
            )
        m = pattern.match(name)
        if m:
            return template, int(m.group(1)) if m.groups() else None
    return None


def fill(template: str, layer: int | None) -> str:
    """Instantiate a template for one layer."""
    return template.replace("{i}", str(layer)) if layer is not None else template


def ffn_hidden_size(dim: int, multiple_of: int, multiplier: float | None = None) -> int:
    """Meta's feed-forward size formula (params.json -> intermediate_size):
    ``multiple_of * ceil(int(multiplier * int(8 * dim / 3)) / multiple_of)``; 7B: 11008, Llama-2-70B: 28672."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier:
        hidden = int(multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)


def hf_to_meta_rows(block: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder whole heads of q/k rows (or bias entries) from HF's rotary layout to Meta's (``block`` holds whole
    heads)."""
    rows = block.shape[0]
    return block.reshape(rows // head_dim, 2, head_dim // 2, -1).transpose(1, 2).reshape(block.shape)


def meta_to_hf_rows(block: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`hf_to_meta_rows`."""
    rows, cols = block.shape
    return block.reshape(rows // head_dim, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
