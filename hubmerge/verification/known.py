"""The built-in table of known published files (``data/known_hashes.json``): altered copies of known adapters,
and the LLaMA-type / Alpaca-type tokenizer mix-up caught by hash."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from ..errors import IncompatibleError, VerificationError


@functools.cache
def known_hashes() -> dict[str, Any]:
    """The built-in table of known published files (tokenizers, adapters, original and merged checkpoints)."""
    return json.loads(resources.files("hubmerge").joinpath("data/known_hashes.json").read_text(encoding="utf-8"))


def known_name(sha256: str) -> str | None:
    """Display name of a known file with this SHA256, if any."""
    for group in ("tokenizers", "adapters", "originals", "merged"):
        for entry in known_hashes()[group]:
            if entry["sha256"] == sha256:
                return entry["name"]
    return None


def check_known_file(repo_id: str | None, filename: str, sha256: str) -> None:
    """Raise when ``filename`` of a known published repo has a different SHA256 than the one published.

    Raises:
        VerificationError: naming the file, both hashes and the fix.
    """
    if repo_id is None:
        return
    for entry in known_hashes()["adapters"]:
        if repo_id.lower() in entry["repos"] and entry["file"] == filename and entry["sha256"] != sha256:
            raise VerificationError(
                f"{repo_id}/{filename}: SHA256 {sha256[:16]}... differs from the published {entry['name']} file "
                f"({entry['sha256'][:16]}...); the file is corrupt or altered: delete it from the cache and download "
                "it again"
            )


def tokenizer_type(sha256: str | None) -> dict[str, Any] | None:
    """The known-tokenizer entry (name, type, vocab_size) for a tokenizer.model SHA256, if known."""
    return next((t for t in known_hashes()["tokenizers"] if t["sha256"] == sha256), None)


def check_tokenizer_matches(
    adapter_label: str, repo_id: str | None, tokenizer_sha: str | None, vocab_rows: int | None
) -> None:
    """Catch, by hash, a known tokenizer.model of the wrong family shipped with an adapter (the classic mix-up of
    the LLaMA-type and Alpaca-type tokenizers), before any shape error could hide it.

    The adapter's family is known from the table (by repo) or from its embedding rows (49953 vs 49954).

    Raises:
        IncompatibleError: naming both families and the fix.
    """
    found = tokenizer_type(tokenizer_sha)
    if found is None:
        return
    wanted = next(
        (e["tokenizer"] for e in known_hashes()["adapters"] if repo_id and repo_id.lower() in e["repos"]), None
    )
    if wanted is None and vocab_rows is not None:
        wanted = next((t["type"] for t in known_hashes()["tokenizers"] if t["vocab_size"] == vocab_rows), None)
    if wanted is not None and wanted != found["type"]:
        same_type = [t for t in known_hashes()["tokenizers"] if t["type"] == wanted]
        expected = next((t for t in same_type if t["vocab_size"] == vocab_rows), same_type[0])["name"]
        raise IncompatibleError(
            f"adapter {adapter_label}: its tokenizer.model is the {found['name']} ({found['vocab_size']} tokens) but "
            f"the adapter needs the {expected}; use the tokenizer.model published with this adapter"
        )
