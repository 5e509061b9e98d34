"""Open a base folder in whichever layout it has: an HF folder, or an original Meta checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .base import ArrivingWeights, BaseModel, open_hf
from .meta import is_meta_folder, open_meta


def open_base(folder: Path, *, verify: bool = True, arriving: ArrivingWeights | None = None) -> BaseModel:
    """Open a base model lazily (an HF folder's safetensors files may be ``arriving``: see
    :class:`~hubmerge.model.base.ArrivingWeights`). A Meta checkpoint folder (``consolidated.*.pth``, no config.json)
    is verified first unless ``verify`` is false, then joined and permuted on the fly
    (:func:`hubmerge.model.meta.open_meta`).

    Returns:
        a :class:`~hubmerge.model.base.BaseModel`.
    Raises:
        InputError / CorruptFileError: a missing folder, a bad config or damaged weights, tensors missing or foreign
        to the model. VerificationError: a Meta checkpoint failing its checksums.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: base folder not found; give --base an existing folder or a Hub ID")
    if is_meta_folder(folder):
        return open_meta(folder, verify=verify)
    return open_hf(folder, arriving)
