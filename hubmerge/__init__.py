"""hubmerge: turn LoRA adapters into full, ready-to-run models (LLaMA, Mistral, Qwen2, Gemma), streaming and verified.

The pipeline, one module per stage: ``sources`` (resolve, fetch) -> ``verify`` -> ``plan`` -> ``merging`` -> ``write``
-> ``publish``; ``pipeline`` runs them in order. The public API is re-exported here; the heavy parts (torch) load on
first use, so ``import hubmerge.testing.localhub`` or ``hubmerge --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CorruptFileError,
    HubAccessError,
    HubmergeError,
    IncompatibleError,
    InputError,
    OutputError,
    UnsafeFileError,
    VerificationError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "merge": "pipeline",
    "convert": "conversion",
    "plan_merge": "pipeline",
    "MergeResult": "result",
    "MergePlan": "plan",
    "preview": "dryrun",
    "push": "publish",
    "PushResult": "publish",
    "check_push_target": "publish",
    "PushTarget": "publish",
    "verify_target": "verify",
    "Hub": "inputs.hub",
}

if TYPE_CHECKING:
    from .conversion import convert
    from .dryrun import preview
    from .inputs.hub import Hub
    from .pipeline import merge, plan_merge
    from .plan import MergePlan
    from .publish import PushResult, PushTarget, check_push_target, push
    from .result import MergeResult
    from .verify import verify_target


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hubmerge' has no attribute {name!r}")


__all__ = [
    "merge",
    "plan_merge",
    "MergeResult",
    "MergePlan",
    "preview",
    "convert",
    "push",
    "PushResult",
    "check_push_target",
    "PushTarget",
    "verify_target",
    "Hub",
    "HubmergeError",
    "InputError",
    "CorruptFileError",
    "UnsafeFileError",
    "IncompatibleError",
    "HubAccessError",
    "VerificationError",
    "OutputError",
]
