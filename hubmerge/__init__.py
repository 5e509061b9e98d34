"""hubmerge: turn LoRA adapters into full, ready-to-run LLaMA-family models, streaming and verified.

The pipeline, one module per stage: ``sources`` (resolve, fetch) -> ``verify`` -> ``plan`` -> ``merge`` -> ``write``
-> ``publish``; ``pipeline`` runs them in order. The public API is re-exported here.
"""

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
from .pipeline import MergeResult, merge, plan_merge
from .plan import MergePlan

__version__ = "0.1.0"

__all__ = [
    "merge",
    "plan_merge",
    "MergeResult",
    "MergePlan",
    "HubmergeError",
    "InputError",
    "CorruptFileError",
    "UnsafeFileError",
    "IncompatibleError",
    "HubAccessError",
    "VerificationError",
    "OutputError",
]
