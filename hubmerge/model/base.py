"""The base model: an HF-format LLaMA folder opened lazily (config, tensor index, tokenizer), never loaded."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError, InputError
from ..jsonio import index_weight_map, load_json
from ..tensorio import TensorSource, read_safetensors, read_torch_zip
from ..verification.checklists import CheckRow
from . import layouts
from .tokenizer import TokenizerInfo, read_tokenizer

# Weight layouts of an HF folder, in order of preference: (index file, single file, reader).
_WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors", read_safetensors),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", read_torch_zip),
)
SUPPORTED = "LLaMA-family models (config.json model_type 'llama', e.g. LLaMA, Llama-2, Chinese-LLaMA)"


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

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def num_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.hidden_size // self.num_heads)

    @property
    def vocab_size(self) -> int:
        return self.tensors["model.embed_tokens.weight"].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors["model.embed_tokens.weight"].dtype


def read_config(folder: Path) -> dict[str, Any]:
    """Read and check ``config.json`` of an HF LLaMA folder.

    Raises:
        InputError: missing or unreadable config, or a model type other than LLaMA.
    """
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(
            f"{folder}: no config.json; point --base at a Hugging Face-format LLaMA folder or a Meta "
            "checkpoint folder (consolidated.*.pth + params.json)"
        )
    config = load_json(path)
    model_type = config.get("model_type")
    if model_type != "llama":
        raise InputError(f"{path}: model_type {model_type!r} is not supported; hubmerge merges {SUPPORTED}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if type(config.get(key)) is not int or config[key] <= 0:
            raise InputError(f"{path}: missing or invalid {key!r}; restore the original config.json")
    for key in ("num_key_value_heads", "head_dim", "vocab_size"):
        if config.get(key) is not None and (type(config[key]) is not int or config[key] <= 0):
            raise InputError(f"{path}: {key!r} is not a positive integer; restore the original config.json")
    if config["num_hidden_layers"] > layouts.MAX_LAYERS:
        raise InputError(
            f"{path}: num_hidden_layers {config['num_hidden_layers']} is far beyond any LLaMA model "
            f"(at most {layouts.MAX_LAYERS}); restore the original config.json"
        )
    return config


def open_checkpoint(folder: Path) -> tuple[dict[str, TensorSource], list[Path]]:
    """Index the weights of an HF folder (single or sharded safetensors, else single or sharded .bin).

    Returns:
        ``(tensors, files)``.
    Raises:
        InputError: no weights, or an index naming a missing file. CorruptFileError: a damaged shard.
    """
    for index_name, single_name, reader in _WEIGHT_LAYOUTS:
        index_path, single_path = folder / index_name, folder / single_name
        if index_path.is_file():
            weight_map = index_weight_map(index_path)
            files = list(dict.fromkeys(folder / f for f in weight_map.values()))
            for f in files:
                if f.parent != folder or not f.is_file():
                    raise InputError(
                        f"{index_path}: lists {f.name}, which is not in {folder}; download the missing shard"
                    )
            tensors: dict[str, TensorSource] = {}
            for f in files:
                tensors.update(reader(f))
            missing = [n for n, f in weight_map.items() if n not in tensors]
            if missing:
                raise CorruptFileError(
                    f"{index_path}: {missing[0]} is not in {weight_map[missing[0]]}; "
                    "the shard or the index is damaged, download both again"
                )
            return tensors, files
        if single_path.is_file():
            return dict(reader(single_path)), [single_path]
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


def open_hf(folder: Path) -> BaseModel:
    """Open an HF LLaMA base folder and check it holds exactly the tensors its config implies.

    Returns:
        a :class:`BaseModel`.
    Raises:
        InputError / CorruptFileError: see :func:`read_config` and :func:`open_checkpoint`; tensors missing or foreign
        to a LLaMA model of this config.
    """
    config = read_config(folder)
    tensors, files = open_checkpoint(folder)
    expected = layouts.hf_tensor_names(config)
    for name in list(tensors):
        if layouts.match(name, layouts.HF_DROPPED) or (name == "lm_head.weight" and name not in expected):
            del tensors[name]  # stale rotary caches; a tied head transformers never reads
    check_tensor_names(
        tensors,
        expected,
        unknown=f"{folder}: tensor {{name}} does not belong to a LLaMA model with this config.json "
        f"({{count}} such); hubmerge merges {SUPPORTED}",
        missing=f"{folder}: the weights lack {{name}} ({{count}} tensors missing); the download is "
        "incomplete or config.json belongs to another model",
    )
    ordered = {n: tensors[n] for n in expected}
    embed = ordered["model.embed_tokens.weight"].shape
    vocab = config.get("vocab_size") or (embed[0] if embed else 0)
    for name, shape in layouts.hf_shapes(config, vocab).items():  # tensors no adapter touches are copied as they are
        if tuple(ordered[name].shape) != shape:
            raise InputError(
                f"{folder}: {name} is {list(ordered[name].shape)} but config.json implies {list(shape)}; "
                "config.json belongs to another model or the weights are damaged: restore both from one release"
            )
    extra = [folder / "generation_config.json"] if (folder / "generation_config.json").is_file() else []
    return BaseModel(folder, config, ordered, files, read_tokenizer(folder), extra)
