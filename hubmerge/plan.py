"""Plan a merge: decide, for every output tensor, where it comes from and which LoRA terms add to it, and check
everything that can be checked before the first byte is written (shapes, ranks, vocabulary order, tokenizer size).

The same :class:`MergePlan` drives the merge, every writer, the dry-run and the recipe.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import IncompatibleError, InputError
from .model.adapters import CONTEXT_KEYS, SHAPE_KEYS, Adapter, LoraPair
from .model.architectures import Architecture
from .model.base import BaseModel
from .model.tokenizer import CONFIG_ONLY_FILES, TokenizerInfo
from .tensorio import TensorRef, TensorSource
from .verification.hashing import file_digest

DTYPE_NAMES = {  # what --dtype accepts
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"float16"``/``"fp16"``, ``"bfloat16"``/``"bf16"``, ``"float32"``/``"fp32"`` or a torch dtype; None keeps the
    base's. Raises InputError for anything else."""
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return DTYPE_NAMES[value.lower()]
    except KeyError:
        raise InputError(f"unknown dtype {value!r}; use float16, bfloat16 or float32") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class LoraTerm:
    """One adapter's LoRA contribution to one tensor."""

    adapter: int  # index into MergePlan.adapters
    pair: LoraPair


@dataclass
class TensorPlan:
    """How one output tensor is made: read ``source`` (from the base or the adapter ``origin``), add ``terms``."""

    name: str
    source: TensorSource
    origin: str  # "base" or the label of the adapter whose whole matrix replaced the base's
    terms: list[LoraTerm] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def changed(self) -> bool:
        return self.origin != "base" or bool(self.terms)


@dataclass
class MergePlan:
    """Everything the merge and the writers need, decided and checked up front."""

    base: BaseModel
    adapters: list[Adapter]
    tensors: list[TensorPlan]
    dtype: torch.dtype
    vocab_size: int
    config: dict[str, Any]  # the output config.json
    tokenizer: TokenizerInfo
    warnings: list[str] = field(default_factory=list)

    @property
    def dtype_name(self) -> str:
        """The output dtype as configs and recipes spell it (``float16``)."""
        return dtype_name(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the output dtype."""
        n = 0
        for t in self.tensors:
            numel = 1
            for d in t.shape:
                numel *= d
            n += numel * self.out_dtype(t).itemsize
        return n

    def out_dtype(self, tensor: TensorPlan) -> torch.dtype:
        """Floating tensors take the output dtype; anything else (rare) keeps its own."""
        return self.dtype if tensor.source.dtype.is_floating_point else tensor.source.dtype

    def tokenizer_files(self) -> list[Path]:
        """Tokenizer files for an HF output: the chosen tokenizer's, plus the base's tokenizer_config.json and
        special_tokens_map.json when it lacks them (never the base's vocabulary files: they would contradict it)."""
        files = list(self.tokenizer.files)
        have = {p.name for p in files}
        if self.base.tokenizer is not None and self.base.tokenizer is not self.tokenizer:
            files += [p for p in self.base.tokenizer.files if p.name in CONFIG_ONLY_FILES and p.name not in have]
        return files

    def generated_files(self) -> dict[str, dict[str, Any]]:
        """JSON files for an HF output that the base implies without holding them (a Meta checkpoint's
        generation_config.json and tokenizer config), except those a copied file already provides."""
        copied = {p.name for p in self.base.extra_files + self.tokenizer_files()}
        return {name: doc for name, doc in self.base.generated.items() if name not in copied}

    def side_files(self) -> dict[str, Path | dict[str, Any]]:
        """The non-weight files of an HF output, by name: a copied file as its path, a generated one as its JSON.
        What llama.cpp's converter would read beside the weights (tokenizer config, generation config)."""
        files: dict[str, Path | dict[str, Any]] = {p.name: p for p in self.base.extra_files + self.tokenizer_files()}
        return {**files, **self.generated_files()}

    def describe(self) -> list[str]:
        """Human-readable lines: base, each adapter in order, and the output."""
        b = self.base
        lines = [
            f"base: {b.path} ({b.arch.name}, hidden {b.hidden_size}, {b.num_layers} layers, "
            f"{b.num_heads} heads, {b.num_kv_heads} kv heads, vocab {b.vocab_size}, {dtype_name(b.dtype)})"
        ]
        for i, a in enumerate(self.adapters, 1):
            scales = sorted({round(s, 6) for s in a.scales})
            replaced = ", ".join(n.rsplit(".", 2)[-2] for n in a.replacements) or "nothing"
            vocab = f" -> vocab {a.vocab_size}" if a.vocab_size else ""
            context = "".join(f", {k} {v}" for k, v in a.model_config.items() if k in CONTEXT_KEYS)
            lines.append(
                f"adapter {i}: {a.label} ({a.layout} layout) r={a.r} alpha={a.lora_alpha:g}"
                f"{' rslora' if a.use_rslora else ''} scale={'/'.join(f'{s:g}' for s in scales) or '-'}, "
                f"{len(a.lora)} LoRA modules ({', '.join(a.kinds) or 'none'}), replaces {replaced}{vocab}{context}"
            )
        changed = sum(t.changed for t in self.tensors)
        lines.append(
            f"output: {dtype_name(self.dtype)}, vocab {self.vocab_size} (tokenizer from "
            f"{self.tokenizer.folder}), {len(self.tensors)} tensors ({changed} changed), "
            f"{self.nbytes / 1e9:.2f} GB of weights"
        )
        return lines + [f"warning: {w}" for w in self.warnings]


def vocab_shrink_message(label: str, rows: int, previous: str, prev_rows: int) -> str:
    """The message for an adapter whose vocabulary is smaller than what came before it (base or adapter)."""
    if previous == "the base":
        return (
            f"adapter {label} has a {rows}-token vocabulary, smaller than the base's {prev_rows}: "
            "it was trained for another base model; use the base it was made for"
        )
    return (
        f"adapter {label} has a {rows}-token vocabulary, smaller than the {prev_rows} tokens of "
        f"{previous} given before it; adapters apply in the order given and the vocabulary cannot shrink: "
        "reverse the order (for the Plus recipe: the llama-plus adapter first, then alpaca-plus)"
    )


def _check_lora_shape(adapter: Adapter, pair: LoraPair, shape: tuple[int, ...]) -> None:
    """The adapter's tensors for ``pair`` fit a base tensor of ``shape``; refuse with the likely cause."""
    got = [tuple(t.shape) for t in pair.tensors]
    want: list[tuple[int, ...]]
    if pair.kind == "linear":
        want = [(pair.r, shape[1]), (shape[0], pair.r)] + ([(shape[0],)] if pair.magnitude is not None else [])
    elif pair.kind == "embedding":
        want = [(pair.r, shape[0]), (shape[1], pair.r)] + ([(shape[1],)] if pair.magnitude is not None else [])
    elif pair.kind == "bias":
        want = [tuple(shape)]
    else:
        want = [(len(pair.indices), *shape[1:])]
        if max(pair.indices) >= shape[0]:
            raise IncompatibleError(
                f"adapter {adapter.label}: trains the rows of token ids up to {max(pair.indices)} in {pair.module}, "
                f"which has {shape[0]} rows; the adapter was trained with a larger vocabulary: use its base"
            )
    if got != want:
        names = {
            "linear": ["lora_A", "lora_B", "magnitude"],
            "embedding": ["lora_embedding_A", "lora_embedding_B", "magnitude"],
        }.get(pair.kind, [pair.variant] * len(got))
        have = ", ".join(f"{n} {list(g)}" for n, g in zip(names, got))
        raise IncompatibleError(
            f"adapter {adapter.label}: {pair.module} has {have} but the base tensor is {list(shape)} (needs "
            f"{' / '.join(str(list(w)) for w in want)}); the adapter was trained for a different model size, "
            "e.g. a 7B adapter on a 13B base: use the matching base"
        )


def _take_model_config(adapter: Adapter, config: dict[str, Any]) -> None:
    """Apply an adapter's config.json long-context settings to the output ``config``, once its shape keys are checked
    against the base's (the project's merge script copies that config.json whole)."""
    for key in SHAPE_KEYS:
        mine, base = adapter.model_config.get(key), config.get(key)
        if mine is not None and base is not None and mine != base:
            raise IncompatibleError(
                f"adapter {adapter.label}: its config.json says {key} {mine} but the base has {base}; the adapter "
                "was trained for another model: use the matching base"
            )
    config.update({k: v for k, v in adapter.model_config.items() if k in CONTEXT_KEYS})


def _check_tokenizer(tok: TokenizerInfo, rows: int, owner: str, vocab_changed: bool, padding: bool) -> None:
    """The tokenizer must define exactly one token per embedding row; families that pad their embeddings
    (``vocab_padding``) may have more rows than tokens, never fewer."""
    if tok.size == rows or (padding and tok.size < rows):
        return
    if owner == "the base" and vocab_changed:
        raise IncompatibleError(
            f"the adapters extend the vocabulary to {rows} tokens but none ships a tokenizer (tokenizer.model or "
            "tokenizer.json): put the adapter's tokenizer files in its folder"
        )
    hint = ""
    if abs(tok.size - rows) == 1:
        hint = " (a LLaMA-type tokenizer with an Alpaca-type adapter, or the reverse)"
    raise IncompatibleError(
        f"{tok.model_file or tok.folder / 'tokenizer.json'}: the tokenizer has {tok.size} tokens but {owner}'s "
        f"embeddings have {rows} rows{hint}; use the tokenizer published with that model"
    )


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    return a.stat().st_size == b.stat().st_size and file_digest(a) == file_digest(b)


def adapter_warnings(base: BaseModel, adapters: Sequence[Adapter]) -> list[str]:
    """Check each adapter's depth against the base's and look for an adapter given twice.

    Returns:
        warnings: an adapter covering fewer layers than the base (without ``layers_to_transform`` to explain it),
        the same adapter weights given more than once (their changes would add up).
    Raises:
        IncompatibleError: an adapter with weights for more layers than the base has.
    """
    layers = base.arch.dims(base.config)["layers"]
    warnings = []
    for i, adapter in enumerate(adapters):
        if adapter.layers > layers:
            raise IncompatibleError(
                f"adapter {adapter.label} has weights for {adapter.layers} layers (up to model.layers."
                f"{adapter.layers - 1}) but the base has {layers}: it was made for a deeper model, so merging only "
                "the layers that exist would give a broken model; use the base it was trained on"
            )
        if 0 < adapter.layers < layers and not adapter.config.get("layers_to_transform"):
            warnings.append(
                f"{adapter.label}: adapts only the first {adapter.layers} of the base's {layers} layers; "
                "check it was made for this base (a smaller model's adapter would merge without error)"
            )
        earlier = next((a for a in adapters[:i] if _same_file(a.weights, adapter.weights)), None)
        if earlier is not None:
            warnings.append(
                f"{adapter.label}: the same adapter weights as {earlier.label}, given before it: its changes are "
                "applied twice; name it once unless that is what you want"
            )
    return warnings


def _tied_replacements(
    adapter: Adapter, arch: Architecture, config: dict[str, Any]
) -> tuple[dict[str, TensorRef], bool]:
    """The whole matrices ``adapter`` replaces, and whether a tie stays. On a tied model trained with PEFT's
    ``ensure_weight_tying`` the embedding and the head were one trained matrix (saved under both names): it replaces
    the embedding and the tie stays, as PEFT's merge keeps it."""
    embed, head = arch.role("embed"), arch.role("head")
    replaced: dict[str, TensorRef] = dict(adapter.replacements)
    if not (arch.tied(config) and adapter.config.get("ensure_weight_tying") and {embed, head} & set(replaced)):
        return replaced, False
    embed_matrix, head_matrix = replaced.pop(embed, None), replaced.pop(head, None)
    matrix = embed_matrix or head_matrix
    assert matrix is not None  # one of them, by the test above
    replaced[embed] = matrix
    return replaced, True


def _check_targets(adapter: Adapter, arch: Architecture) -> None:
    """target_modules given as names must be modules of the base's family."""
    targets = adapter.config.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if str(t).rsplit(".", 1)[-1] not in arch.lora_modules]
        if unknown:
            raise IncompatibleError(
                f"adapter {adapter.label}: target_modules {unknown} are not modules of a {arch.name} model; "
                "the adapter was trained for another architecture, use the base it was made for"
            )


def _replace_whole(
    adapter: Adapter,
    replacements: dict[str, TensorRef],
    keep_tie: bool,
    plans: dict[str, TensorPlan],
    config: dict[str, Any],
    vocab_owner: str,
    arch: Architecture,
) -> None:
    """Let ``adapter``'s whole matrices (modules_to_save) replace what came before, after checking their shapes;
    on a tied model whose adapter trained one side, untie as PEFT's merge does."""
    embed, head_name = arch.role("embed"), arch.role("head")
    for name, ref in replacements.items():
        if not keep_tie and name in (embed, head_name) and head_name not in plans and arch.tied(config):
            # A tied model whose adapter trained one side: PEFT's merge unties them, the head keeping the
            # matrix it shared until now.
            config["tie_word_embeddings"] = False
            plans[head_name] = TensorPlan(head_name, plans[embed].source, plans[embed].origin)
            plans[head_name].terms = list(plans[embed].terms)
        if name not in plans:
            raise IncompatibleError(
                f"adapter {adapter.label} replaces {name}, which the base does not have; "
                "it was trained for another architecture"
            )
        current = plans[name].shape
        if name in (embed, head_name):
            if tuple(ref.shape[1:]) != current[1:]:
                raise IncompatibleError(
                    f"adapter {adapter.label}: {name} is {list(ref.shape)} but the base's is {list(current)}; "
                    "the adapter was trained for a different model size, use the matching base"
                )
            if ref.shape[0] < current[0]:
                raise IncompatibleError(vocab_shrink_message(adapter.label, ref.shape[0], vocab_owner, current[0]))
        elif tuple(ref.shape) != current:
            raise IncompatibleError(
                f"adapter {adapter.label}: {name} is {list(ref.shape)}, the base's is "
                f"{list(current)}; use the base the adapter was trained on"
            )
        plans[name] = TensorPlan(name, ref, adapter.label)


def _add_terms(index: int, adapter: Adapter, plans: dict[str, TensorPlan], base: BaseModel) -> None:
    """Add adapter ``index``'s LoRA (DoRA, bias, token rows) terms to the tensors they change, checking shapes."""
    for name, pair in adapter.lora.items():
        if name not in plans and pair.kind == "bias":
            raise IncompatibleError(
                f"adapter {adapter.label} has lora_bias on {pair.module}, whose base layer has no bias; PEFT "
                "cannot merge that either: use the base the adapter was trained on"
            )
        if name not in plans:
            raise IncompatibleError(
                f"adapter {adapter.label} adapts {pair.module}, which this base does not have "
                f"({base.arch.name}, {base.num_layers} layers); the adapter was made for another model"
            )
        _check_lora_shape(adapter, pair, plans[name].shape)
        plans[name].terms.append(LoraTerm(index, pair))


def build_plan(
    base: BaseModel, adapters: Sequence[Adapter], dtype: str | torch.dtype | None = None, *, conversion: bool = False
) -> MergePlan:
    """Plan merging ``adapters`` in order into ``base`` (with ``conversion``, no adapters: a format conversion).

    Linear deltas add up; whole matrices (modules_to_save) replace what came before, including earlier deltas to
    that tensor, as sequential ``merge_and_unload()`` calls would.

    Returns:
        a checked :class:`MergePlan`.
    Raises:
        IncompatibleError: an adapter does not fit the base or the adapters before it, or the tokenizer size does not
        match the merged embeddings. InputError: bad dtype, no tokenizer at all.
    """
    if not adapters and not conversion:
        raise InputError("no adapters given; name at least one LoRA adapter (folder or Hub ID)")
    out_dtype = parse_dtype(dtype) or base.dtype
    arch = base.arch
    embed, head_name = arch.role("embed"), arch.role("head")
    config = copy.deepcopy(base.config)
    plans: dict[str, TensorPlan] = {n: TensorPlan(n, src, "base") for n, src in base.tensors.items()}
    vocab_rows, vocab_owner = base.vocab_size, "the base"
    warnings: list[str] = []
    warnings += adapter_warnings(base, adapters)
    for index, adapter in enumerate(adapters):
        warnings += adapter.warnings
        _take_model_config(adapter, config)
        _check_targets(adapter, arch)
        replacements, keep_tie = _tied_replacements(adapter, arch, config)
        _replace_whole(adapter, replacements, keep_tie, plans, config, vocab_owner, arch)
        if embed in replacements:
            rows = replacements[embed].shape[0]
            if adapter.tokenizer is not None:
                _check_tokenizer(adapter.tokenizer, rows, f"adapter {adapter.label}", True, arch.vocab_padding)
            vocab_rows, vocab_owner = rows, f"adapter {adapter.label}"
        _add_terms(index, adapter, plans, base)

    head = plans.get(head_name)
    if head is not None and head.shape[0] != vocab_rows:
        raise IncompatibleError(
            f"lm_head has {head.shape[0]} rows but embed_tokens has {vocab_rows} after "
            f"{vocab_owner}; an adapter replaced one without the other, so it cannot be merged"
        )
    tok_owner = next((a for a in reversed(adapters) if a.tokenizer is not None), None)
    tokenizer = tok_owner.tokenizer if tok_owner else base.tokenizer
    if tokenizer is None:
        raise InputError(
            f"{base.path}: no tokenizer.model or tokenizer.json in the base or any adapter; "
            "copy the base model's tokenizer files into its folder"
        )
    _check_tokenizer(
        tokenizer,
        vocab_rows,
        f"adapter {tok_owner.label}" if tok_owner else "the base",
        vocab_rows != base.vocab_size,
        arch.vocab_padding,
    )

    config["vocab_size"] = vocab_rows
    # transformers 5 writes "dtype", older releases "torch_dtype": keep the base's spelling (both read the old one).
    config["dtype" if "dtype" in config else "torch_dtype"] = dtype_name(out_dtype)
    # The architecture's order, except that tensors read whole from an adapter (modules_to_save: the extended
    # embeddings and lm_head of a Chinese-LLaMA adapter) come first: they need nothing from the base, so a streamed
    # push writes and uploads them while the base's first shard is still downloading, instead of at the end.
    order = sorted(arch.tensor_names(config), key=lambda n: plans[n].origin == "base")
    return MergePlan(
        base, list(adapters), [plans[n] for n in order], out_dtype, vocab_rows, config, tokenizer, warnings
    )
