"""Model families as data: one JSON file per ``model_type`` in ``hubmerge/data/architectures/`` (as mergekit does),
read into a typed :class:`Architecture`. The merge, the checks, the dry run and the writers ask it which tensors a
config implies and their shapes, which modules LoRA may target, which tensors are tied, and the Meta and GGUF names.

A file holds:

- ``config``: the config.json keys of the dimensions (``layers``, ``hidden``, ``heads``, ``kv_heads``, ``head_dim``,
  ``vocab``, ``intermediate``); ``kv_heads`` defaults to ``heads``, ``head_dim`` to ``hidden / heads``.
- ``defaults``: the family's config class defaults for flags config.json may leave out (transformers writes only
  what differs from them), e.g. Gemma's ``tie_word_embeddings: true``.
- ``tensors``, in the order transformers saves them: ``hf`` (``{i}`` is the layer), ``shape`` (dimension names, or
  products such as ``kv_heads*head_dim``), and optionally ``lora`` (the module name an adapter targets), ``role``
  (``embed`` / ``head``), ``when`` / ``unless`` (a config flag that adds / removes the tensor), ``rotary`` (the head
  count whose rotary layout the rows follow: Meta's and llama.cpp's llama layout interleave them), ``meta`` +
  ``split`` (the Meta checkpoint name and model-parallel split dim), ``gguf`` (llama.cpp's name, null when it has none)
  and ``gguf_shift`` (added to the values in GGUF, as llama.cpp's converter does for Gemma's norms).
- ``vocab_padding``: embedding rows may exceed the tokenizer's size (Qwen2 pads them); never the reverse.
- ``pth``: the family can be written as a Meta checkpoint. ``dropped``: stale tensors old conversions carry.
- ``gguf``: llama.cpp's ``arch``, the ``rope_scaling`` types its converter writes for it, and the ``metadata`` keys
  (``value``: ``dim:<name>``, ``config:<key>`` (left out when absent, unless a ``default`` is given),
  ``rope:rope_theta``, or a literal).

Adding a family is adding a file (and a test that checks it against transformers, as tests/test_families.py does).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import layouts

DIMENSIONS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "vocab", "intermediate")
DEFAULT_ROPE_THETA = 10000.0
MAX_LAYERS = 1024  # the deepest released models of these families have ~130 layers


@dataclass(frozen=True)
class TensorSpec:
    """One weight of the family (a template over layers when ``hf`` holds ``{i}``)."""

    hf: str
    shape: tuple[str, ...]
    lora: str | None = None
    role: str | None = None
    when: str | None = None
    unless: str | None = None
    rotary: str | None = None
    meta: str | None = None
    split: int | None = None
    gguf: str | None = None
    gguf_shift: float | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


@dataclass(frozen=True)
class GGUFSpec:
    """How llama.cpp's converter writes the family: its arch name, rope scaling types, metadata keys."""

    arch: str
    rope_scaling: tuple[str, ...]
    metadata: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Architecture:
    """A model family read from its data file. Methods take the model's config.json as a mapping."""

    model_type: str
    name: str
    description: str
    architectures: tuple[str, ...]
    keys: Mapping[str, str]
    defaults: Mapping[str, Any]
    tensors: tuple[TensorSpec, ...]
    dropped: tuple[str, ...]
    vocab_padding: bool
    pth: bool
    gguf: GGUFSpec | None

    # ------------------------------------------------------------------------------------------------ the config

    def flag(self, config: Mapping[str, Any], key: str) -> bool:
        """A boolean config flag, with the family's default when config.json leaves it out."""
        value = config.get(key)
        return bool(self.defaults.get(key, False) if value is None else value)

    def tied(self, config: Mapping[str, Any]) -> bool:
        """Whether lm_head shares embed_tokens' matrix (and is therefore not stored)."""
        return self.flag(config, "tie_word_embeddings")

    def dims(self, config: Mapping[str, Any]) -> dict[str, int]:
        """The named dimensions of a config (``vocab`` from config.json; the weights may say otherwise)."""
        out: dict[str, int] = {}
        for dim in DIMENSIONS:
            value = config.get(self.keys[dim])
            if value is not None:
                out[dim] = int(value)
        out.setdefault("kv_heads", out["heads"])
        out.setdefault("head_dim", out["hidden"] // out["heads"])
        return out

    def check_config(self, config: Mapping[str, Any], path: Path) -> None:
        """Raise InputError when a dimension the tensors need is missing or not a positive integer."""
        for dim in ("layers", "hidden", "heads", "intermediate"):
            value = config.get(self.keys[dim])
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(
                    f"{path}: missing or invalid {self.keys[dim]!r}; restore the original config.json", path=path
                )
        if config[self.keys["layers"]] > MAX_LAYERS:  # every list of tensor names grows with it
            raise InputError(
                f"{path}: {self.keys['layers']} {config[self.keys['layers']]} is far beyond any real model (at most "
                f"{MAX_LAYERS}); restore the original config.json",
                path=path,
            )
        for dim in ("kv_heads", "head_dim", "vocab"):
            value = config.get(self.keys[dim])
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise InputError(
                    f"{path}: invalid {self.keys[dim]!r} {value!r}; restore the original config.json", path=path
                )
        dims = self.dims(config)
        if dims["heads"] % dims["kv_heads"]:
            raise InputError(
                f"{path}: {dims['kv_heads']} key/value heads do not divide {dims['heads']} attention heads; "
                "restore the original config.json",
                path=path,
            )

    # ----------------------------------------------------------------------------------------------- the tensors

    def present(self, spec: TensorSpec, config: Mapping[str, Any]) -> bool:
        """Whether a model with this config holds ``spec`` (its ``when`` / ``unless`` flags)."""
        if spec.when and not self.flag(config, spec.when):
            return False
        return not (spec.unless and self.flag(config, spec.unless))

    def tensor_names(self, config: Mapping[str, Any]) -> list[str]:
        """Every weight name a checkpoint with this config holds, in the order transformers saves them."""
        layers = self.dims(config)["layers"]
        names: list[str] = []
        specs = [s for s in self.tensors if self.present(s, config)]
        i = 0
        while i < len(specs):
            if not specs[i].per_layer:
                names.append(specs[i].hf)
                i += 1
                continue
            block = []
            while i < len(specs) and specs[i].per_layer:
                block.append(specs[i])
                i += 1
            names += [layouts.fill(s.hf, layer) for layer in range(layers) for s in block]
        return names

    def tensor_shapes(self, config: Mapping[str, Any], vocab: int | None = None) -> dict[str, tuple[int, ...]]:
        """The shape of every weight of :meth:`tensor_names`, with ``vocab`` rows (default: config.json's)."""
        dims = self.dims(config)
        if vocab is not None:
            dims["vocab"] = vocab
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self.tensor_names(config):
            spec, _ = self.find(name)
            shapes[name] = tuple(_product(expr, dims) for expr in spec.shape)
        return shapes

    def find(self, name: str) -> tuple[TensorSpec, int | None]:
        """The spec ``name`` instantiates and its layer; KeyError when the family has no such tensor."""
        found = layouts.match(name, self._by_template)
        if found is None:
            raise KeyError(name)
        return self._by_template[found[0]], found[1]

    def spec(self, name: str) -> TensorSpec | None:
        """The spec of ``name``, or None when the family has no such tensor."""
        try:
            return self.find(name)[0]
        except KeyError:
            return None

    @functools.cached_property
    def _by_template(self) -> dict[str, TensorSpec]:
        return {s.hf: s for s in self.tensors}

    def role(self, role: str) -> str:
        """The HF name of the tensor with this role (``embed`` or ``head``)."""
        return next(s.hf for s in self.tensors if s.role == role)

    @property
    def lora_modules(self) -> frozenset[str]:
        """Module names (the last component of a module path) LoRA may target in this family."""
        return frozenset(s.lora for s in self.tensors if s.lora)

    def rotary_heads(self, name: str, config: Mapping[str, Any]) -> int | None:
        """Head count whose rotary layout ``name``'s rows follow (Meta / llama.cpp llama layout), or None."""
        spec = self.spec(name)
        if spec is None or spec.rotary is None:
            return None
        return self.dims(config)[spec.rotary]

    def meta_name(self, name: str) -> tuple[str, int | None] | None:
        """``(Meta checkpoint name, split dim)`` of an HF name, or None when the Meta layout has no such tensor."""
        spec, layer = self.find(name)
        return (layouts.fill(spec.meta, layer), spec.split) if spec.meta else None

    def gguf_name(self, name: str) -> str | None:
        """llama.cpp's GGUF name of an HF name, or None when llama.cpp has no such tensor."""
        spec, layer = self.find(name)
        return layouts.fill(spec.gguf, layer) if spec.gguf else None

    def is_dropped(self, name: str) -> bool:
        """A stale tensor some old conversions carry that no current loader wants."""
        return layouts.match(name, self.dropped) is not None


def _product(expr: str, dims: Mapping[str, int]) -> int:
    value = 1
    for factor in expr.split("*"):
        value *= int(factor) if factor.isdigit() else dims[factor]
    return value


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The rotary settings of an HF config as one dict with ``rope_type`` and ``rope_theta``: transformers 5's
    ``rope_parameters``, else the older ``rope_scaling`` (``type`` or ``rope_type``) with the top-level
    ``rope_theta``, as llama.cpp's converter reads them."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params["rope_type"] = str(params.get("rope_type") or params.get("type") or "default")
    params.pop("type", None)
    params["rope_theta"] = float(params.get("rope_theta") or config.get("rope_theta") or DEFAULT_ROPE_THETA)
    return params


def _load(text: str) -> Architecture:
    data = json.loads(text)
    gguf = data.get("gguf")
    return Architecture(
        model_type=data["model_type"],
        name=data["name"],
        description=data["description"],
        architectures=tuple(data["architectures"]),
        keys=data["config"],
        defaults=data.get("defaults", {}),
        tensors=tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in data["tensors"]),
        dropped=tuple(data.get("dropped", ())),
        vocab_padding=bool(data.get("vocab_padding", False)),
        pth=bool(data.get("pth", False)),
        gguf=GGUFSpec(gguf["arch"], tuple(gguf["rope_scaling"]), tuple(gguf["metadata"])) if gguf else None,
    )


@functools.cache
def families() -> dict[str, Architecture]:
    """Every family shipped in ``hubmerge/data/architectures``, by ``model_type``."""
    folder = resources.files("hubmerge").joinpath("data/architectures")
    found = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            arch = _load(entry.read_text(encoding="utf-8"))
            found[arch.model_type] = arch
    return found


def supported() -> str:
    """One phrase naming the supported families, for messages."""
    return ", ".join(f"{a.name} ({t!r})" for t, a in families().items())


def for_config(config: Mapping[str, Any], path: Path | str) -> Architecture:
    """The family of a config.json (its ``model_type``).

    Raises:
        InputError: an unknown model_type, naming the supported ones and how to add one.
    """
    model_type = config.get("model_type")
    arch = families().get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise InputError(
            f"{path}: model_type {model_type!r} is not supported; hubmerge merges {supported()}; "
            "to add a family, add its table to hubmerge/data/architectures/ (see docs/architectures.md)",
            path=path,
        )
    return arch


def llama() -> Architecture:
    """The LLaMA family (the Meta checkpoint layout's)."""
    return families()["llama"]


def lora_modules() -> frozenset[str]:
    """Module names LoRA may target in any supported family."""
    return frozenset().union(*(a.lora_modules for a in families().values()))
