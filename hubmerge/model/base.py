"""The base model: an HF-format folder of a supported family opened lazily (config, tensor index, tokenizer), never
loaded. Which tensors it must hold comes from its family's table (:mod:`hubmerge.model.architectures`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import CorruptFileError, InputError
from ..jsonio import index_weight_map, load_json
from ..tensorio import TensorSource, read_safetensors, read_torch_zip
from ..verification.checklists import CheckRow
from .architectures import Architecture, for_config, llama, supported
from .tokenizer import TokenizerInfo, read_tokenizer

# Weight layouts of an HF folder, in order of preference: (index file, single file, reader).
_WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors", read_safetensors),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", read_torch_zip),
)


@dataclass
class BaseModel:
    """An opened base: ``tensors`` maps HF names to lazily readable sources; nothing is loaded."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorSource]
    files: list[Path]  # weight files, in index order
    tokenizer: TokenizerInfo | None
    extra_files: list[Path] = field(default_factory=list)  # generation_config.json and the like, copied to outputs
    # JSON files an HF output needs that the base does not hold as files (a Meta checkpoint's config side).
    generated: dict[str, dict[str, Any]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)  # SHA256 of weight files already computed to verify them
    checks: list[CheckRow] = field(default_factory=list)  # what verifying the base checked, for display
    arch: Architecture = field(default_factory=llama)  # the model family, from config.json's model_type

    @property
    def hidden_size(self) -> int:
        return self.arch.dims(self.config)["hidden"]

    @property
    def num_layers(self) -> int:
        return self.arch.dims(self.config)["layers"]

    @property
    def num_heads(self) -> int:
        return self.arch.dims(self.config)["heads"]

    @property
    def num_kv_heads(self) -> int:
        return self.arch.dims(self.config)["kv_heads"]

    @property
    def head_dim(self) -> int:
        return self.arch.dims(self.config)["head_dim"]

    @property
    def vocab_size(self) -> int:
        return self.tensors[self.arch.role("embed")].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[self.arch.role("embed")].dtype


def read_config(folder: Path) -> tuple[dict[str, Any], Architecture]:
    """Read and check ``config.json`` of an HF folder, and find its family.

    Returns:
        ``(config, architecture)``.
    Raises:
        InputError: missing or unreadable config, a model type hubmerge has no table for, missing dimensions.
    """
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(
            f"{folder}: no config.json; point --base at a Hugging Face-format model folder or a Meta "
            "checkpoint folder (consolidated.*.pth + params.json)"
        )
    config = load_json(path)
    arch = for_config(config, path)
    arch.check_config(config, path)
    return config, arch


class ArrivingWeights(Protocol):
    """Weight files of a base that are still being downloaded: their indexes are known, their bytes not yet."""

    def has(self, path: Path) -> bool:
        """Whether ``path`` is one of the arriving files."""

    def read(self, path: Path) -> dict[str, TensorSource]:
        """The tensors of an arriving file (reading them waits for the file)."""


def open_checkpoint(
    folder: Path, arriving: ArrivingWeights | None = None
) -> tuple[dict[str, TensorSource], list[Path]]:
    """Index the weights of an HF folder (single or sharded safetensors, else single or sharded .bin), some of which
    may be ``arriving``.

    Returns:
        ``(tensors, files)``.
    Raises:
        InputError: no weights, or an index naming a missing file. CorruptFileError: a damaged shard.
    """

    def present(path: Path) -> bool:
        return path.is_file() or (arriving is not None and arriving.has(path))

    def read(path: Path, layout_reader: Callable[[Path], Mapping[str, TensorSource]]) -> Mapping[str, TensorSource]:
        return arriving.read(path) if arriving is not None and arriving.has(path) else layout_reader(path)

    for index_name, single_name, layout_reader in _WEIGHT_LAYOUTS:
        index_path, single_path = folder / index_name, folder / single_name
        if index_path.is_file():
            weight_map = index_weight_map(index_path)
            files = list(dict.fromkeys(folder / f for f in weight_map.values()))
            for f in files:
                if f.parent != folder or not present(f):
                    raise InputError(
                        f"{index_path}: lists {f.name}, which is not in {folder}; download the missing shard"
                    )
            tensors: dict[str, TensorSource] = {}
            for f in files:
                tensors.update(read(f, layout_reader))
            missing = [n for n, f in weight_map.items() if n not in tensors]
            if missing:
                raise CorruptFileError(
                    f"{index_path}: {missing[0]} is not in {weight_map[missing[0]]}; "
                    "the shard or the index is damaged, download both again"
                )
            return tensors, files
        if present(single_path):
            return dict(read(single_path, layout_reader)), [single_path]
    raise InputError(
        f"{folder}: no model.safetensors or pytorch_model.bin (nor their sharded index); "
        "point --base at a complete Hugging Face-format model folder"
    )


def check_tensor_names(names: Iterable[str], expected: Sequence[str], *, unknown: str, missing: str) -> None:
    """Raise InputError for the first of ``names`` foreign to ``expected``, else the first expected name absent;
    ``unknown`` and ``missing`` are the messages, with ``{name}`` and ``{count}`` filled in."""
    have = set(names)
    for found, message in ((sorted(have - set(expected)), unknown), ([n for n in expected if n not in have], missing)):
        if found:
            raise InputError(message.format(name=found[0][:200], count=len(found)))


def open_hf(folder: Path, arriving: ArrivingWeights | None = None) -> BaseModel:
    """Open an HF base folder and check it holds exactly the tensors its config implies (some of its safetensors
    files may be ``arriving``).

    Returns:
        a :class:`BaseModel`.
    Raises:
        InputError / CorruptFileError: see :func:`read_config` and :func:`open_checkpoint`; tensors missing or foreign
        to a model of this family and config.
    """
    config, arch = read_config(folder)
    tensors, files = open_checkpoint(folder, arriving)
    expected = arch.tensor_names(config)
    head = arch.role("head")
    for name in list(tensors):
        if arch.is_dropped(name) or (name == head and name not in expected):
            del tensors[name]  # stale rotary caches; a tied head transformers never reads
    check_tensor_names(
        tensors,
        expected,
        unknown=f"{folder}: tensor {{name}} does not belong to a {arch.name} model with this config.json "
        f"({{count}} such); hubmerge merges {supported()}",
        missing=f"{folder}: the weights lack {{name}} ({{count}} tensors missing); the download is "
        "incomplete or config.json belongs to another model",
    )
    ordered = {n: tensors[n] for n in expected}
    extra = [folder / "generation_config.json"] if (folder / "generation_config.json").is_file() else []
    _check_shapes(folder, arch, config, ordered)
    return BaseModel(folder, config, ordered, files, read_tokenizer(folder), extra, arch=arch)


def _check_shapes(folder: Path, arch: Architecture, config: dict[str, Any], tensors: dict[str, TensorSource]) -> None:
    """Every tensor has the shape config.json implies (the embedding rows are the vocabulary, whatever it says)."""
    embed = arch.role("embed")
    vocab = tensors[embed].shape[0] if len(tensors[embed].shape) == 2 else 0
    for name, want in arch.tensor_shapes(config, vocab).items():
        got = tuple(tensors[name].shape)
        if got != want:
            raise InputError(
                f"{folder}: {name} is {list(got)} but config.json implies {list(want)}; the weights and "
                "config.json belong to different models, download both again",
                path=folder,
            )
