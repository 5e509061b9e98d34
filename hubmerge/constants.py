"""Defaults that more than one module (and the Space) must agree on, in one place."""

from __future__ import annotations

DEFAULT_FORMATS: tuple[str, ...] = ("hf",)
DEFAULT_MAX_SHARD_SIZE = "5GB"  # the Hub's convention (10**9 bytes a GB), as transformers' save_pretrained
STAGING_SUFFIX = ".hubmerge-partial"  # the hidden sibling folder a run writes into: .<out>.hubmerge-partial


def default_out_name(last_adapter: str) -> str:
    """The output folder (or repo name) when none is given: ``<last adapter's name>-merged``."""
    return f"{last_adapter}-merged"
