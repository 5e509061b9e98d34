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
from ..tensorio import TensorRef, read_safetensors, read_torch_zip
from . import architectures
from .tokenizer import TokenizerInfo, load_json, read_tokenizer

WEIGHT_FILES = (("adapter_model.safetensors", read_safetensors), ("adapter_model.bin", read_torch_zip))

# Adapter tensor keys, tried in order. An adapter name may sit before ".weight".
# - LoRA factors of a Linear, of an Embedding;
# - "original": the pre-training copy PEFT saves beside a module it trained whole (save_embedding_layers): unused;
# - "wrapped": a whole module under its ModulesToSaveWrapper name; "whole": the same under its plain name, which is
#   the key PEFT loads (it wins when both are present; 2023 adapters only have the plain one).
_KEY_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("linear", re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")),
    ("embedding", re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<part>[AB])(?:\.[^.]+)?$")),
    ("original", re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.original_module\.(?P<part>weight|bias)$")),
    (
        "wrapped",
        re.compile(
            r"^(?:base_model\.model\.)?(?P<module>.+)\.modules_to_save(?:\.[^.]+)?"
            r"\.(?P<part>weight|bias)$"
        ),
    ),
    ("whole", re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>weight|bias)$")),
)


@dataclass
class LoraPair:
    """The two LoRA factors of one module and the scale they merge with.

    ``linear``: delta = scale * B @ A, A [r, in], B [out, r]. ``embedding``: delta = scale * (B @ A).T, A [r, vocab],
    B [hidden, r].
    """

    module: str
    kind: Literal["linear", "embedding"]
    A: TensorRef
    B: TensorRef
    r: int
    alpha: float
    scale: float


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
    def vocab_size(self) -> int | None:
        """Rows of the embedding this adapter replaces, or None when it keeps the vocabulary."""
        ref = self.replacements.get("model.embed_tokens.weight")
        return ref.shape[0] if ref is not None else None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the first pattern that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targeted(config: dict[str, Any], module: str) -> bool:
    """Whether PEFT would have put a LoRA layer on ``module`` for this config."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, module):
            return False
        if not isinstance(exclude, str) and any(module == e or module.endswith("." + e) for e in exclude):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return True  # PEFT filled in the architecture's defaults; the tensors say which modules were adapted
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if not any(module == t or module.endswith("." + t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is not None and layers != []:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", module)
        layers = [layers] if isinstance(layers, int) else layers
        return found is not None and int(found.group(1)) in layers
    return True


def lora_scale(config: dict[str, Any], r: float, alpha: float) -> float:
    """PEFT's scaling for rank ``r`` and ``lora_alpha`` ``alpha``: alpha / r, or alpha / sqrt(r) with use_rslora."""
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def config_layout(config: dict[str, Any]) -> Literal["2023", "current"]:
    """ "2023" for configs written by PEFT 0.2/0.3 (they carry ``enable_lora`` / ``merge_weights``), else "current"."""
    return "2023" if "enable_lora" in config or "merge_weights" in config else "current"


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """Read and check ``adapter_config.json``.

    Raises:
        InputError: missing, unreadable, not LoRA, or using a LoRA variant whose merge differs (DoRA, biases).
    """
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise InputError(f"{folder}: no adapter_config.json; point at a PEFT LoRA adapter folder")
    config = load_json(path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"{path}: peft_type {peft_type} is not supported; hubmerge merges LoRA adapters")
    if config.get("use_dora"):
        raise InputError(f"{path}: DoRA adapters (use_dora) are not supported; merge them with PEFT")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{path}: {key} must be a positive number, found {value!r}")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if str(t).rsplit(".", 1)[-1] not in architectures.lora_modules()]
        if unknown:
            raise InputError(
                f"{path}: target_modules {unknown} are not modules of any supported model family "
                f"({architectures.supported()}); this adapter was trained for another architecture"
            )
    return config


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
    replacements: dict[str, TensorRef] = {}
    wrapped: dict[str, TensorRef] = {}
    for key, ref in tensors.items():
        for kind, pattern in _KEY_PATTERNS:
            m = pattern.match(key)
            if m:
                break
        else:
            raise InputError(
                f"{weights}: tensor {key} is not a LoRA weight hubmerge understands "
                "(only plain LoRA factors and whole replaced modules can be merged)"
            )
        if kind == "whole":
            replacements[f"{m['module']}.{m['part']}"] = ref
        elif kind == "wrapped":
            wrapped[f"{m['module']}.{m['part']}"] = ref
        elif kind != "original":
            factors.setdefault((m["module"], kind), {})[m["part"]] = ref
    replacements = {**wrapped, **replacements}
    if not factors and not replacements:
        raise InputError(
            f"{weights}: holds no LoRA tensors ({size} bytes); the training run saved an empty "
            "adapter, save it again from the trained model"
        )

    warnings: list[str] = []
    if config.get("fan_in_fan_out"):
        warnings.append(f"{label}: fan_in_fan_out=true ignored, as PEFT does for LLaMA's nn.Linear layers")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    lora: dict[str, LoraPair] = {}
    skipped = []
    for (module, kind), parts in factors.items():
        if set(parts) != {"A", "B"}:
            missing = ({"A", "B"} - set(parts)).pop()
            raise InputError(f"{weights}: {module} has no lora_{missing} tensor; the adapter file is damaged")
        if not _targeted(config, module):
            skipped.append(module)
            continue
        r = int(_pattern_value(rank_pattern, module, config.get("r", 8)))
        alpha = float(_pattern_value(alpha_pattern, module, config.get("lora_alpha", 8)))
        a, b = parts["A"], parts["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
            found = a.shape[0] if len(a.shape) == 2 else list(a.shape)
            raise InputError(
                f"{folder / 'adapter_config.json'}: says r={r} for {module} but its lora_A has "
                f"{found} rows; the config belongs to another adapter, use the one published with "
                "these weights"
            )
        scale = lora_scale(config, r, alpha)
        lora[f"{module}.weight"] = LoraPair(module, kind, a, b, r, alpha, scale)  # type: ignore[arg-type]
    if skipped:
        warnings.append(
            f"{label}: {len(skipped)} LoRA modules not in target_modules ignored, as PEFT does (e.g. {skipped[0]})"
        )
    return Adapter(
        label, folder, config, config_layout(config), weights, lora, replacements, read_tokenizer(folder), warnings
    )
