"""PEFT LoRA adapters in the 2023 layout (``adapter_model.bin``, ``enable_lora``/``merge_weights`` config keys) and the
current one (``adapter_model.safetensors``): config, scaling rules and a lazy index of the tensors.

Scaling follows PEFT: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), with ``rank_pattern`` /
``alpha_pattern`` overriding r and alpha for modules whose name ends with a pattern. Which modules carry LoRA also
follows PEFT's rules (``target_modules`` as names or a regex, ``exclude_modules``, ``layers_to_transform``), so the
merge agrees with ``PeftModel.merge_and_unload()`` on the same files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import InputError
from ..jsonio import json_field
from ..tensorio import TensorRef, read_safetensors, read_torch_zip
from . import architectures
from .patterns import MAX_NAME, Deadline, compile_pattern
from .tokenizer import TokenizerInfo, load_json, read_tokenizer

WEIGHT_FILES = (("adapter_model.safetensors", read_safetensors), ("adapter_model.bin", read_torch_zip))
# A model config.json beside the adapter (Chinese-LLaMA-Alpaca-2's 16K/64K LoRAs ship one, and the project's merge
# script copies it): the merge takes its long-context settings, and the shape keys must match the base.
CONTEXT_KEYS = ("rope_scaling", "rope_parameters", "rope_theta", "max_position_embeddings")
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")

# Adapter tensor keys, tried in order. An adapter name may sit before ".weight".
# - LoRA factors of a Linear, of an Embedding; DoRA's magnitude vector; the bias on lora_B (lora_bias);
# - trained rows of an embedding (trainable_token_indices): the rows only, their ids are in the config;
# - "original": the pre-training copy PEFT saves beside a module it trained whole (save_embedding_layers): unused;
# - "base_layer": the base layer under a LoRA or token wrapper, saved when the vocabulary was resized: it replaces
#   the base's matrix, as PEFT loads it;
# - "wrapped": a whole module under its ModulesToSaveWrapper name; "whole": the same under its plain name, which is
#   the key PEFT loads (it wins when both are present; 2023 adapters only have the plain one).
_PREFIX = r"^(?:base_model\.model\.)?(?P<module>.+?)"
_KEY_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(_PREFIX + tail))
    for kind, tail in (
        ("linear", r"\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$"),
        ("embedding", r"\.lora_embedding_(?P<part>[AB])(?:\.[^.]+)?$"),
        ("magnitude", r"\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$"),
        ("bias", r"\.lora_B(?:\.[^.]+)?\.bias$"),
        ("tokens", r"\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$"),
        ("original", r"\.original_module\.(?P<part>weight|bias)$"),
        ("base_layer", r"(?:\.token_adapter)?\.base_layer\.(?P<part>weight|bias)$"),
        ("wrapped", r"\.modules_to_save(?:\.[^.]+)?\.(?P<part>weight|bias)$"),
        ("whole", r"\.(?P<part>weight|bias)$"),
    )
)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d{1,6})\.")


@dataclass
class LoraPair:
    """One adapter's change to one tensor, as PEFT's ``merge_and_unload()`` makes it.

    ``linear``: delta = scale * B @ A, A [r, in], B [out, r]; with a DoRA ``magnitude`` [out], each row of W + delta
    is then scaled to magnitude[row] / ||(W + delta)[row]||. ``embedding``: delta = scale * (B @ A).T, A [r, vocab],
    B [hidden, r]; with a DoRA ``magnitude`` [hidden], each column of E + delta is scaled to magnitude[column] / its
    norm over the whole vocabulary (as PEFT's DoRA embedding merge). ``bias`` (lora_bias): delta = scale * B, B [out], no A. ``rows`` (trainable_token_indices): the
    rows ``indices`` become B [len(indices), hidden], no A, scale 1.
    """

    module: str
    kind: Literal["linear", "embedding", "bias", "rows"]
    A: TensorRef | None
    B: TensorRef
    r: int
    alpha: float
    scale: float
    magnitude: TensorRef | None = None
    indices: tuple[int, ...] = ()

    @property
    def tensors(self) -> list[TensorRef]:
        """The adapter tensors this change reads."""
        return [t for t in (self.A, self.B, self.magnitude) if t is not None]

    @property
    def variant(self) -> str:
        """The adapter kind's name, as the README and the recipe list it."""
        if self.kind in ("linear", "embedding"):
            name = "dora" if self.magnitude is not None else "lora"
            return name if self.kind == "linear" else f"embedding_{name}"
        return {"bias": "lora_bias", "rows": "trainable_tokens"}[self.kind]


@dataclass
class Adapter:
    """An opened adapter. ``lora`` and ``replacements`` are keyed by the HF weight name they change."""

    label: str
    path: Path
    config: dict[str, Any]
    layout: Literal["2023", "current"]
    weights: Path
    lora: dict[str, LoraPair]
    replacements: dict[str, TensorRef]
    tokenizer: TokenizerInfo | None
    warnings: list[str] = field(default_factory=list)
    # What the adapter's own config.json sets for the output (long-context LoRAs: rope scaling, context length).
    model_config: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        """Every file of the adapter the merge reads: weights, configs, tokenizer files."""
        configs = [self.path / "adapter_config.json"] + ([self.path / "config.json"] if self.model_config else [])
        return [self.weights, *configs, *(self.tokenizer.files if self.tokenizer else [])]

    layers: int = 0  # 1 + the highest layer index any of its tensors names (0: none names a layer)

    @property
    def r(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def kinds(self) -> list[str]:
        """The adapter kinds this adapter uses (``lora``, ``dora``, ``lora_bias``, ...), sorted."""
        return sorted({p.variant for p in self.lora.values()})

    @property
    def scales(self) -> list[float]:
        """The distinct LoRA scales of its factor pairs."""
        return sorted({p.scale for p in self.lora.values() if p.kind in ("linear", "embedding")})

    @property
    def vocab_size(self) -> int | None:
        """Rows of the embedding this adapter replaces, or None when it keeps the vocabulary."""
        ref = self.replacements.get("model.embed_tokens.weight")
        return ref.shape[0] if ref is not None else None


class ModuleRules:
    """PEFT's rules for one adapter config: which modules carry LoRA (``target_modules`` as names or a regex,
    ``exclude_modules``, ``layers_to_transform``) and the rank / alpha of each (``rank_pattern``, ``alpha_pattern``).
    Every regex is compiled and checked once (:mod:`hubmerge.model.patterns`) and all matching shares a deadline."""

    def __init__(self, config: dict[str, Any], where: Path):
        self.config, self.where = config, where
        self.deadline = Deadline(where)
        targets, exclude = config.get("target_modules"), config.get("exclude_modules")
        self.target_regex = compile_pattern(targets, where, "target_modules") if isinstance(targets, str) else None
        self.targets = None if targets is None or isinstance(targets, str) else list(targets)
        self.exclude_regex = compile_pattern(exclude, where, "exclude_modules") if isinstance(exclude, str) else None
        self.exclude = [] if not exclude or isinstance(exclude, str) else list(exclude)
        layers = config.get("layers_to_transform")
        self.layers = [layers] if isinstance(layers, int) else (layers or None)
        self.patterns = {
            key: [(compile_pattern(k, where, key, r"(.*\.)?({})$"), v) for k, v in (config.get(key) or {}).items()]
            for key in ("rank_pattern", "alpha_pattern")
        }

    def _match(self, pattern: re.Pattern[str], module: str, full: bool) -> bool:
        self.deadline.check()
        return (pattern.fullmatch(module) if full else pattern.match(module)) is not None

    def targeted(self, module: str) -> bool:
        """Whether PEFT would have put a LoRA layer on ``module`` for this config."""
        if self.exclude_regex is not None and self._match(self.exclude_regex, module, True):
            return False
        if any(module == e or module.endswith("." + e) for e in self.exclude):
            return False
        if self.target_regex is not None:
            return self._match(self.target_regex, module, True)
        if self.targets is None:
            return True  # PEFT filled in the architecture's defaults; the tensors say which modules were adapted
        if not any(module == t or module.endswith("." + t) for t in self.targets):
            return False
        if self.layers:
            found = re.match(r".*?\.[^.]*\.(\d+)\.", module)
            return found is not None and int(found.group(1)) in self.layers
        return True

    def value(self, key: str, module: str, default: Any) -> Any:
        """PEFT's rank/alpha pattern lookup (``key``: rank_pattern or alpha_pattern): the value of the first pattern
        that matches the end of the module name, else ``default``."""
        for pattern, value in self.patterns[key]:
            if self._match(pattern, module, False):
                return value
        return default


def lora_scale(config: dict[str, Any], r: float, alpha: float) -> float:
    """PEFT's scaling for rank ``r`` and ``lora_alpha`` ``alpha``: alpha / r, or alpha / sqrt(r) with use_rslora."""
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def config_layout(config: dict[str, Any]) -> Literal["2023", "current"]:
    """ "2023" for configs written by PEFT 0.2/0.3 (they carry ``enable_lora`` / ``merge_weights``), else "current"."""
    return "2023" if "enable_lora" in config or "merge_weights" in config else "current"


# Types of the config keys hubmerge reads (PEFT writes these; anything else is a damaged or foreign file).
_CONFIG_TYPES: dict[str, type | tuple[type, ...]] = {
    "peft_type": str,
    "target_modules": (str, list),
    "exclude_modules": (str, list),
    "layers_to_transform": (int, list),
    "modules_to_save": (str, list),
    "rank_pattern": dict,
    "alpha_pattern": dict,
    "use_rslora": bool,
    "use_dora": bool,
    "lora_bias": bool,
    "fan_in_fan_out": bool,
}


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """Read and check ``adapter_config.json``.

    Raises:
        InputError: missing, unreadable, not LoRA, values of the wrong type, an unsafe or invalid regex, or
        values PEFT would refuse.
    """
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise InputError(f"{folder}: no adapter_config.json; point at a PEFT LoRA adapter folder")
    config = load_json(path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"{path}: peft_type {peft_type[:40]} is not supported; hubmerge merges LoRA adapters")
    if config.get("use_dora") and config.get("lora_bias"):
        raise InputError(f"{path}: use_dora with lora_bias is a combination PEFT refuses to load; fix the config")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{path}: {key} must be a positive number, found {value!r}")
    for key, kinds in _CONFIG_TYPES.items():
        json_field(config, key, kinds, path)
    for key in ("target_modules", "exclude_modules", "layers_to_transform"):
        value = config.get(key)
        item = int if key == "layers_to_transform" else str
        if isinstance(value, list) and not all(type(v) is item for v in value):
            raise InputError(f"{path}: {key} must list {'layer numbers' if item is int else 'module names'}")
    for key in ("rank_pattern", "alpha_pattern"):
        values = (config.get(key) or {}).values()
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
            raise InputError(f"{path}: {key} must map module patterns to positive numbers")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if str(t).rsplit(".", 1)[-1] not in architectures.lora_modules()]
        if unknown:
            raise InputError(
                f"{path}: target_modules {unknown} are not modules of any supported model family "
                f"({architectures.supported()}); this adapter was trained for another architecture"
            )
    return config


def _attach_variants(
    pair: LoraPair,
    extras: dict[str, dict[str, TensorRef]],
    config: dict[str, Any],
    config_file: Path,
    weights: Path,
    lora: dict[str, LoraPair],
) -> None:
    """Give ``pair`` its DoRA magnitude and add its lora_bias change to ``lora``, checking both against the config
    (PEFT loads only what the config announces, so a contradiction means a mismatched config)."""
    module = pair.module
    magnitude, bias = extras["magnitude"].pop(module, None), extras["bias"].pop(module, None)
    if bool(config.get("use_dora")) != (magnitude is not None):
        raise InputError(
            f"{config_file}: says use_dora={bool(config.get('use_dora'))} but {module} "
            f"{'has a' if magnitude is not None else 'has no'} lora_magnitude_vector in {weights.name}; "
            "the config belongs to another adapter, use the one published with these weights"
        )
    pair.magnitude = magnitude
    if bias is not None:
        if not config.get("lora_bias"):
            raise InputError(
                f"{config_file}: says lora_bias=false but {module} has a lora_B bias in {weights.name}; "
                "the config belongs to another adapter, use the one published with these weights"
            )
        lora[f"{module}.bias"] = LoraPair(module, "bias", None, bias, pair.r, pair.alpha, pair.scale)


def _token_indices(config: dict[str, Any], module: str, config_file: Path) -> tuple[int, ...]:
    """The token ids whose rows an adapter trained in ``module`` (PEFT's ``trainable_token_indices``: a list for
    the input embeddings, or ``{module name: ids}``).

    Raises:
        InputError: no ids for that module, or ids that are not distinct non-negative integers.
    """
    spec = config.get("trainable_token_indices")
    ids: Any = None
    if isinstance(spec, list) and module.rsplit(".", 1)[-1] == "embed_tokens":
        ids = spec
    elif isinstance(spec, dict):
        ids = next((v for k, v in spec.items() if module == k or module.endswith("." + k)), None)
    valid = isinstance(ids, list) and ids and all(type(i) is int and i >= 0 for i in ids)
    if not valid or len(set(ids)) != len(ids):
        raise InputError(
            f"{config_file}: trainable_token_indices gives {ids!r} for {module}, but its weights hold trained "
            "rows for it: distinct token ids are needed; use the config published with these weights"
        )
    return tuple(ids)


def read_model_config(folder: Path) -> dict[str, Any]:
    """The :data:`CONTEXT_KEYS` and :data:`SHAPE_KEYS` of the adapter folder's config.json, if it has one.

    Raises:
        InputError: not a JSON object, or values of the wrong type.
    """
    path = folder / "config.json"
    if not path.is_file():
        return {}
    doc = load_json(path)
    if not isinstance(doc, dict):
        raise InputError(f"{path}: not a JSON object; remove it or use the one published with the adapter")
    out = {k: doc[k] for k in CONTEXT_KEYS + SHAPE_KEYS if doc.get(k) is not None}
    for key, value in out.items():
        ok = (
            isinstance(value, dict)
            if key.startswith("rope_") and key != "rope_theta"
            else (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)
        )
        if not ok:
            raise InputError(
                f"{path}: {key} is {value!r:.80}; fix it or use the config.json published with the adapter"
            )
    return out


def open_adapter(folder: Path, label: str | None = None) -> Adapter:
    """Open a LoRA adapter folder: config, tensor index (nothing loaded) and tokenizer files.

    Returns:
        an :class:`Adapter`.
    Raises:
        InputError / CorruptFileError / UnsafeFileError: bad config, missing, empty, damaged or unsafe weights,
        tensors that contradict the config.
    """
    folder = Path(folder)
    label = label or str(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: adapter folder not found; give a LoRA adapter folder or a Hub ID")
    config = read_adapter_config(folder)
    rules = ModuleRules(config, folder / "adapter_config.json")
    for name, reader in WEIGHT_FILES:
        weights = folder / name
        if weights.is_file():
            break
    else:
        raise InputError(f"{folder}: no adapter_model.safetensors or adapter_model.bin; the adapter is incomplete")
    size = weights.stat().st_size
    if size == 0:
        raise InputError(f"{weights}: the file is empty; download or save the adapter again")
    tensors = reader(weights)

    factors: dict[tuple[str, str], dict[str, TensorRef]] = {}
    extras: dict[str, dict[str, TensorRef]] = {"magnitude": {}, "bias": {}, "tokens": {}}  # by module
    replacements: dict[str, TensorRef] = {}
    wrapped: dict[str, TensorRef] = {}
    for key, ref in tensors.items():
        for kind, pattern in _KEY_PATTERNS:
            m = pattern.match(key)
            if m:
                break
        else:
            raise InputError(
                f"{weights}: tensor {key[:200]} is not a LoRA weight hubmerge understands "
                "(only LoRA, DoRA, lora_bias, trainable-token rows and whole replaced modules can be merged)"
            )
        if len(m["module"]) > MAX_NAME:
            raise InputError(f"{weights}: tensor {key[:200]}... does not name a module of a known model")
        if kind in ("whole", "base_layer"):
            replacements[f"{m['module']}.{m['part']}"] = ref
        elif kind == "wrapped":
            wrapped[f"{m['module']}.{m['part']}"] = ref
        elif kind in extras:
            extras[kind][m["module"]] = ref
        elif kind != "original":
            factors.setdefault((m["module"], kind), {})[m["part"]] = ref
    replacements = {**wrapped, **replacements}
    named = [*(m for m, _ in factors), *replacements, *(m for refs in extras.values() for m in refs)]
    layers = 1 + max((int(x[1]) for x in map(_LAYER.search, named) if x), default=-1)
    if not factors and not replacements and not extras["tokens"]:
        raise InputError(
            f"{weights}: holds no LoRA tensors ({size} bytes); the training run saved an empty "
            "adapter, save it again from the trained model"
        )

    warnings: list[str] = []
    if config.get("fan_in_fan_out"):
        warnings.append(f"{label}: fan_in_fan_out=true ignored, as PEFT does for LLaMA's nn.Linear layers")
    config_file = folder / "adapter_config.json"
    lora: dict[str, LoraPair] = {}
    skipped = []
    for (module, kind), parts in factors.items():
        if set(parts) != {"A", "B"}:
            missing = ({"A", "B"} - set(parts)).pop()
            raise InputError(f"{weights}: {module} has no lora_{missing} tensor; the adapter file is damaged")
        if not rules.targeted(module):
            skipped.append(module)
            continue
        r = int(rules.value("rank_pattern", module, config.get("r", 8)))
        alpha = float(rules.value("alpha_pattern", module, config.get("lora_alpha", 8)))
        a, b = parts["A"], parts["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
            found = a.shape[0] if len(a.shape) == 2 else list(a.shape)
            raise InputError(
                f"{config_file}: says r={r} for {module} but its lora_A has "
                f"{found} rows; the config belongs to another adapter, use the one published with "
                "these weights"
            )
        scale = lora_scale(config, r, alpha)
        pair = LoraPair(module, kind, a, b, r, alpha, scale)  # type: ignore[arg-type]
        _attach_variants(pair, extras, config, config_file, weights, lora)
        lora[f"{module}.weight"] = pair
    for kind, refs in extras.items():  # what no LoRA pair claimed
        left = [m for m in refs if m not in skipped and kind != "tokens"]
        if left:
            raise InputError(
                f"{weights}: {left[0]} has a {kind} tensor but no lora_A/lora_B; the adapter file is damaged"
            )
    for module, ref in extras["tokens"].items():
        indices = _token_indices(config, module, config_file)
        if f"{module}.weight" in lora:
            raise InputError(
                f"{config_file}: {module} has both LoRA factors and trainable token rows, which PEFT cannot combine "
                "either; the config belongs to another adapter"
            )
        lora[f"{module}.weight"] = LoraPair(module, "rows", None, ref, 0, 0.0, 1.0, indices=indices)
    if skipped:
        warnings.append(
            f"{label}: {len(skipped)} LoRA modules not in target_modules ignored, as PEFT does (e.g. {skipped[0]})"
        )
    return Adapter(
        label,
        folder,
        config,
        config_layout(config),
        weights,
        lora,
        replacements,
        read_tokenizer(folder),
        warnings,
        model_config=read_model_config(folder),
        layers=layers,
    )
