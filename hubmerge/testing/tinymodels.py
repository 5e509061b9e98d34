"""Tiny but real-format models of every supported family (LLaMA, Mistral, Qwen2, Gemma), tokenizers and LoRA
adapters, plus the PEFT oracle.

Used by the tests, the ``hubmerge demo`` command and the benchmark's tokenizer. Nothing in the
merge itself imports this module: every file here is written with the real libraries
(sentencepiece, transformers, peft, safetensors, torch), so hubmerge's streaming reader is tested
against what those libraries produce, and ``peft_merged_logits`` is the reference it must match.

Facts checked with the installed versions (transformers 5.24, peft 0.21.2, sentencepiece 0.2,
torch 2.13); readers of real adapters rely on them:

* Tokenizer. ``AutoTokenizer`` loads a folder holding only tokenizer.model, tokenizer_config.json
  (``tokenizer_class: LlamaTokenizer``) and special_tokens_map.json offline, converting the
  sentencepiece model to a ``tokenizers`` BPE; ``len(tokenizer)`` equals the sentencepiece size,
  including the in-model ``[PAD]`` of the Alpaca type (``pad_token_id`` = last id). Without
  ``add_bos_token`` in tokenizer_config.json (as in the 2023 files) transformers 5 does NOT
  prepend ``<s>``, although its docstring says the default is True. The converted tokenizer
  always byte-falls-back, so ids only match sentencepiece for characters outside the vocabulary
  when the model has byte pieces (``make_tokenizer`` adds them once ``base_vocab`` leaves room).
* config.json written by transformers 5 says ``"dtype"`` (not ``"torch_dtype"``) and keeps
  ``rope_theta`` under ``"rope_parameters"``.
* fan_in_fan_out. PEFT forces ``fan_in_fan_out=False`` for ``nn.Linear`` targets (UserWarning
  "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`") and resets the
  config object too, so the current layout saves ``"fan_in_fan_out": false``. An adapter whose
  config says true on LLaMA is therefore stored, loaded and merged exactly like a normal one
  (delta = B @ A, never transposed); the 2023 layout here keeps the value it was asked for.
* Scaling (peft 0.21): ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; r and
  alpha are first looked up per module in ``rank_pattern`` / ``alpha_pattern``, whose keys are
  matched against the module name without the ``base_model.model.`` prefix (e.g.
  ``model.layers.0.self_attn.q_proj``) with ``re.match(rf"(.*\\.)?({key})$", name)``, first
  matching key wins, so ``"v_proj"`` hits every layer. An alpha_pattern entry without a
  rank_pattern entry uses the global r.
* Keys, 2023 layout (adapter_model.bin): ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``,
  ..., and for modules_to_save the whole matrices ``base_model.model.model.embed_tokens.weight`` and
  ``base_model.model.lm_head.weight``. Current PEFT writes exactly these keys as well (adapter
  name removed), in adapter_model.safetensors, in the dtype the model had when saved.
* Keys, current layout with a resized vocabulary: ``save_pretrained`` defaults to
  ``save_embedding_layers="auto"``, which compares the model's vocab_size with the config.json at
  ``base_model_name_or_path`` (a local path works offline) and, when it differs, also saves every
  state-dict entry under the embedding modules. Without modules_to_save that adds the resized
  base layers as ``base_model.model.model.embed_tokens.weight`` / ``base_model.model.lm_head.weight``
  (the same names as modules_to_save: the config's ``modules_to_save`` tells them apart, the merge
  result is the same: the matrix replaces the base's). With modules_to_save AND a resized vocab,
  each matrix is saved three times: ``<m>.weight`` and ``<m>.modules_to_save.weight`` (the trained
  copy, identical) and ``<m>.original_module.weight`` (the resized base layer, which must be ignored).
* A 2023 adapter_config.json (``enable_lora``, ``merge_weights``) loads in peft 0.21 with a
  UserWarning "Unexpected keyword arguments ['enable_lora', 'merge_weights'] for class LoraConfig,
  these are ignored" (per the reference notes older PEFT raised). The oracle builds the LoraConfig
  itself from the known fields, so nothing is rewritten on disk and that warning is gone (a config saying
  ``fan_in_fan_out: true`` still gets PEFT's fan_in_fan_out warning). PEFT loads the 2023
  ``...embed_tokens.weight`` into the modules_to_save copy, and merge_and_unload() makes that copy
  the model's matrix. Merging the Plus adapters in reverse order fails in PEFT with
  "RuntimeError: ... size mismatch for base_model.model.model.embed_tokens.modules_to_save.default.weight".
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import random
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from ..model.architectures import families

if TYPE_CHECKING:  # transformers loads lazily: the demo imports this module before it needs the oracle
    from transformers import PreTrainedModel

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
# The Chinese-LLaMA/Alpaca "Plus" recipe in miniature, in the order it applies: a llama-plus-like adapter (2023
# layout, r=8) then an alpaca-plus-like one (current layout, r=16), both replacing the embeddings with a larger vocab.
PLUS_RECIPE: tuple[dict[str, Any], dict[str, Any]] = (
    {"layout": "2023", "r": 8, "alpha": 32, "modules_to_save": ("embed_tokens", "lm_head"), "tokenizer": "llama"},
    {"layout": "current", "r": 16, "alpha": 32, "modules_to_save": ("embed_tokens", "lm_head"), "tokenizer": "alpaca"},
)
DEFAULT_EXTRA = 40  # appended pieces of a "llama" tokenizer built by make_adapter from the base's

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
# Byte fallback needs <unk> <s> </s>, 256 byte pieces and every corpus character ("▁" included).
_BYTE_FALLBACK_MIN = 3 + 256 + len(set("".join(_SYLLABLES))) + 1
_CJK_FIRST, _CJK_COUNT = 0x4E00, 0x9FFF - 0x4E00 + 1


@functools.lru_cache(maxsize=8)
def _trained_base(base_vocab: int) -> bytes:
    import sentencepiece as spm

    # A pseudo-word corpus from a fixed seed: rich enough for a LLaMA-size (32000) BPE in ~1 s.
    rng = random.Random(0)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(max(2000, 8 * base_vocab))]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]),
        model_writer=buf,
        vocab_size=base_vocab,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=base_vocab >= _BYTE_FALLBACK_MIN,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,  # as LLaMA's
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def _with_pieces(model: bytes, pieces: Sequence[str]) -> bytes:
    """Append NORMAL pieces with score 0, as Chinese-LLaMA's merge_tokenizers.py did."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    for text in pieces:
        proto.pieces.add(piece=text, score=0.0, type=pb.ModelProto.SentencePiece.NORMAL)
    return proto.SerializeToString()


def _kind_pieces(kind: str, extra: int) -> list[str]:
    if kind not in ("base", "llama", "alpaca"):
        raise ValueError(f"tokenizer kind must be 'base', 'llama' or 'alpaca', not {kind!r}")
    if not 0 <= extra <= _CJK_COUNT:
        raise ValueError(f"extra must be within 0..{_CJK_COUNT}, not {extra}")
    cjk = [chr(_CJK_FIRST + i) for i in range(extra)] if kind != "base" else []
    return cjk + (["[PAD]"] if kind == "alpaca" else [])


def _write_tokenizer(out: Path, model: bytes, *, pad: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if pad:  # Alpaca type: [PAD] is a piece of tokenizer.model and the pad token
        specials["pad_token"] = "[PAD]"
    config = {**specials, "model_max_length": int(1e30), "tokenizer_class": "LlamaTokenizer"}
    for name, data in (("special_tokens_map.json", specials), ("tokenizer_config.json", config)):
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def make_bpe_tokenizer(out_dir: str | Path, *, vocab: int = 300) -> Path:
    """Write a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json, Qwen2-style, no tokenizer.model)
    trained here on the same pseudo-word corpus, with ``vocab`` ids including two added special tokens
    ``<|endoftext|>`` and ``<|im_start|>`` at the end; byte-identical on every run. Returns ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(4000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(words[i : i + 12]) for i in range(0, len(words), 12)], trainer)
    tok.add_special_tokens(specials)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def tokenizer_size(folder: str | Path) -> int:
    """Token ids of the tokenizer in ``folder``: tokenizer.model's pieces, else tokenizer.json's ids."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        return sp_size(folder / "tokenizer.model")
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1


def sp_size(model_file: str | Path) -> int:
    """Return the number of pieces of a sentencepiece model file (RuntimeError if unreadable)."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()


def make_tokenizer(
    out_dir: str | Path,
    kind: Literal["base", "llama", "alpaca"] = "base",
    *,
    base_vocab: int = 256,
    extra: int = DEFAULT_EXTRA,
) -> Path:
    """Write a LLaMA-style sentencepiece tokenizer (tokenizer.model, tokenizer_config.json,
    special_tokens_map.json as in the 2023 Chinese-LLaMA repos) into ``out_dir`` and return it.

    "base" is a BPE model trained here with exactly ``base_vocab`` pieces (unk=0, bos=1, eos=2,
    byte fallback when ``base_vocab`` >= 283), byte-identical on every run. "llama" appends
    ``extra`` CJK characters (U+4E00 on) => base_vocab + extra pieces; "alpaca" also appends
    "[PAD]" => base_vocab + extra + 1. Raises ValueError for an unknown kind or out-of-range
    extra, RuntimeError (from sentencepiece) if ``base_vocab`` is too small to train.
    """
    pieces = _kind_pieces(kind, extra)
    out = Path(out_dir)
    _write_tokenizer(out, _with_pieces(_trained_base(base_vocab), pieces), pad=kind == "alpaca")
    return out


def _init_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    # Norms near 1, embeddings ~N(0,1), linear layers ~N(0, 1/fan_in): activations stay O(1), so
    # fp16 never overflows and a LoRA delta of ~20% of a weight moves the logits visibly.
    if name.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if len(shape) == 1:
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    std = 1.0 if "embed_tokens" in name else shape[1] ** -0.5
    return std * torch.randn(shape, generator=gen)


def _save_weights(out: Path, tensors: dict[str, torch.Tensor], fmt: str, shards: int) -> None:
    names = list(tensors)
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards must be within 1..{len(names)}, not {shards}")
    stem, ext = {"safetensors": ("model", "safetensors"), "bin": ("pytorch_model", "bin")}[fmt]
    weight_map = {}
    for k in range(shards):
        file = f"{stem}.{ext}" if shards == 1 else f"{stem}-{k + 1:05d}-of-{shards:05d}.{ext}"
        chunk = {n: tensors[n] for n in names[k * len(names) // shards : (k + 1) * len(names) // shards]}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(chunk, out / file, metadata={"format": "pt"})
        else:
            torch.save(chunk, out / file)
        weight_map.update(dict.fromkeys(chunk, file))
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_base(
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    dtype: str = "float16",
    weights: Literal["safetensors", "bin"] = "safetensors",
    shards: int = 1,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    generation_config: bool = True,
    family: str = "llama",
    tokenizer: Literal["sentencepiece", "bpe"] = "sentencepiece",
    vocab_rows: int | None = None,
    **config_kw: Any,
) -> Path:
    """Write a random HF folder of the ``family`` (a transformers model_type: llama, mistral, qwen2, gemma...) into
    ``out_dir`` and return it.

    It holds config.json (vocab_size = tokenizer size, or ``vocab_rows`` when larger: padded embeddings, as
    Qwen2's), the weights in ``dtype`` as model.safetensors / pytorch_model.bin, or with ``shards`` > 1 the numbered
    shards plus their index, the tokenizer files (copied from ``tokenizer_dir``, default: a "base" sentencepiece
    tokenizer, or with ``tokenizer="bpe"`` a byte-level BPE tokenizer.json) and generation_config.json. GQA when
    ``kv_heads`` < ``heads``; intermediate defaults to 3 * hidden; ``config_kw`` go to the config as they are
    (``head_dim``, ``sliding_window``, ``rope_scaling``, ``rope_theta``, ``max_position_embeddings``...). Same
    arguments, same tensors. Raises ValueError for an unknown dtype/weights format or an impossible shard count,
    FileNotFoundError if ``tokenizer_dir`` lacks a file.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if dtype not in _DTYPES or weights not in ("safetensors", "bin"):
        raise ValueError(f"unsupported dtype {dtype!r} or weights format {weights!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    elif tokenizer == "bpe":
        make_bpe_tokenizer(out)
    else:
        make_tokenizer(out)
    vocab = tokenizer_size(out)
    special = {"bos_token_id": 1, "eos_token_id": 2} if tokenizer == "sentencepiece" else {"eos_token_id": vocab - 2}
    config = AutoConfig.for_model(
        family,
        **{
            "vocab_size": max(vocab, vocab_rows or 0),
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads or heads,
            "intermediate_size": intermediate or 3 * hidden,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            **special,
            "tie_word_embeddings": tie_word_embeddings,
            "dtype": dtype,
            **config_kw,
        },
    )
    config.architectures = list(families()[family].architectures)
    config.save_pretrained(out)
    if generation_config:
        GenerationConfig(**special).save_pretrained(out)
    with torch.device("meta"):  # only names and shapes, in transformers' own order
        shapes = {n: t.shape for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if tie_word_embeddings:
        del shapes["lm_head.weight"]  # transformers never saves the tied copy
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: _init_tensor(n, s, gen).to(_DTYPES[dtype]) for n, s in shapes.items()}
    _save_weights(out, tensors, weights, shards)
    return out


@torch.no_grad()
def _randomize_adapter(peft_model: torch.nn.Module, gen: torch.Generator) -> None:
    # The trainable parameters are exactly what the adapter file holds. PEFT's lora_B starts at
    # zero (a no-op merge); here std(s * B @ A) ~ 0.2 std(W) for r=8, alpha=32.
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_A" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
        elif "lora_embedding_" in name:  # PEFT starts one of the two at zero: both random here
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "lora_embedding_B" in name else 1.0))
        elif "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        else:  # a modules_to_save copy, "trained": even the base's rows change
            p.add_(0.1 * p.std() * torch.randn(p.shape, generator=gen))


def make_adapter(
    out_dir: str | Path,
    base_dir: str | Path,
    *,
    layout: Literal["2023", "current"] = "current",
    r: int = 8,
    alpha: int = 32,
    target_modules: Sequence[str] | str = LLAMA_LINEAR,
    use_rslora: bool = False,
    fan_in_fan_out: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    modules_to_save: Sequence[str] = (),
    tokenizer: Literal["llama", "alpaca"] | None = None,
    vocab_from: str | Path | None = None,
    seed: int = 1,
    dtype: str = "float16",
    ensure_weight_tying: bool = False,
    use_dora: bool = False,
    lora_bias: bool = False,
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None,
) -> Path:
    """Write a real PEFT LoRA adapter for the model in ``base_dir`` into ``out_dir`` and return it.

    lora_A and lora_B are random (non-zero), so merging changes the model. ``target_modules`` is
    a list of names or a regex string. With ``tokenizer`` the adapter ships a tokenizer built from
    the base's tokenizer.model plus DEFAULT_EXTRA CJK pieces ("llama") and "[PAD]" ("alpaca");
    ``vocab_from`` instead ships the tokenizer files of that folder (e.g. from make_tokenizer).
    A larger vocab resizes the embeddings (new rows random); with ``modules_to_save=("embed_tokens",
    "lm_head")`` the adapter holds those whole [V, H] matrices (all rows perturbed), like
    Chinese-LLaMA/Alpaca. ``use_dora``, ``lora_bias`` and ``trainable_token_indices`` are PEFT's LoraConfig
    options (current layout only; their tensors are randomized too: DoRA magnitudes, lora_B biases, the trained
    token rows). Put "embed_tokens" in ``target_modules`` for an embedding LoRA.

    layout="current": get_peft_model + save_pretrained -> adapter_model.safetensors and the
    current adapter_config.json. layout="2023": adapter_model.bin (torch.save, 2023 keys, see the
    module docstring) and a 2023 adapter_config.json. Raises ValueError for rslora/patterns in the
    2023 layout, a 2023 vocab extension without modules_to_save, both ``tokenizer`` and
    ``vocab_from``, a shrinking vocab, an unknown layout or dtype.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    if layout not in ("2023", "current") or dtype not in _DTYPES:
        raise ValueError(f"unsupported layout {layout!r} or dtype {dtype!r}")
    if layout == "2023" and (use_rslora or rank_pattern or alpha_pattern or use_dora or lora_bias):
        raise ValueError("use_rslora, rank/alpha patterns, DoRA and lora_bias did not exist in the 2023 layout")
    if layout == "2023" and trainable_token_indices:
        raise ValueError("trainable_token_indices did not exist in the 2023 layout")
    if tokenizer and vocab_from:
        raise ValueError("give tokenizer or vocab_from, not both")
    out, base = Path(out_dir), Path(base_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    if tokenizer:
        base_tokenizer = (base / "tokenizer.model").read_bytes()
        pieces = _kind_pieces(tokenizer, DEFAULT_EXTRA)
        _write_tokenizer(out, _with_pieces(base_tokenizer, pieces), pad=tokenizer == "alpaca")
    elif vocab_from:
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(vocab_from) / name, out / name)
    old_vocab = model.config.vocab_size
    vocab = sp_size(out / "tokenizer.model") if tokenizer or vocab_from else old_vocab
    if vocab < old_vocab:
        raise ValueError(f"the adapter's tokenizer has {vocab} pieces, fewer than the base's {old_vocab}")
    if vocab > old_vocab:
        if layout == "2023" and not {"embed_tokens", "lm_head"} <= set(modules_to_save):
            raise ValueError("a 2023 adapter extends the vocab only with modules_to_save embed_tokens and lm_head")
        model.resize_token_embeddings(vocab, mean_resizing=False)
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        with torch.no_grad():  # new rows from our generator, not transformers' global RNG
            for emb in [embed] if head is embed else [embed, head]:
                emb[old_vocab:] = emb[:old_vocab].std() * torch.randn(emb[old_vocab:].shape, generator=gen)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        modules_to_save=list(modules_to_save) or None,
        ensure_weight_tying=ensure_weight_tying,
        use_dora=use_dora,
        lora_bias=lora_bias,
        trainable_token_indices=trainable_token_indices,
    )
    with warnings.catch_warnings():  # both documented above, and expected here
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to True")
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
        warnings.filterwarnings("ignore", message=".*LoRA tensor.s. have invalid shape")  # PEFT on lora_B biases
        peft_model = get_peft_model(model, config)
        _randomize_adapter(peft_model, gen)
        peft_model.to(_DTYPES[dtype])
        if layout == "current":
            peft_model.save_pretrained(str(out))
            return out
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    torch.save({k: v.contiguous() for k, v in state.items()}, out / "adapter_model.bin")
    config_2023 = {
        "base_model_name_or_path": str(base),
        "bias": "none",
        "enable_lora": None,
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "merge_weights": False,
        "modules_to_save": list(modules_to_save) or None,
        "peft_type": "LORA",
        "r": r,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter_config.json").write_text(json.dumps(config_2023, indent=2, sort_keys=True) + "\n")
    return out


def _adapter_vocab(adapter_dir: Path) -> int | None:
    """Rows of the adapter's embed_tokens matrix, or None when it ships none."""
    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        from safetensors import safe_open

        with safe_open(st, "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    else:
        state = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", mmap=True, weights_only=True)
        shapes = {k: list(v.shape) for k, v in state.items()}
    rows = [
        s[0]
        for k, s in shapes.items()
        if k.endswith(("embed_tokens.weight", "embed_tokens.base_layer.weight", "token_adapter.base_layer.weight"))
    ]
    return rows[0] if rows else None


def peft_merged_model(
    base_dir: str | Path,
    adapter_dirs: Sequence[str | Path],
    *,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """THE ORACLE: the base merged with each adapter in order by PEFT, as a transformers model.

    The base is loaded by transformers in ``dtype``; for each adapter the embeddings are resized
    to its embed_tokens rows when that extends the vocab, then PeftModel.from_pretrained and
    merge_and_unload(). The LoraConfig is built here from the adapter_config.json fields PEFT
    knows, so 2023 configs (enable_lora, merge_weights) load unchanged and without warnings.
    Raises what transformers/PEFT raise on a broken folder (OSError, RuntimeError size mismatch).
    """
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    for adapter in map(Path, adapter_dirs):
        raw = json.loads((adapter / "adapter_config.json").read_text())
        config = LoraConfig(**{k: v for k, v in raw.items() if k in known})
        vocab = _adapter_vocab(adapter)
        if vocab and vocab > model.config.vocab_size:
            model.resize_token_embeddings(vocab, mean_resizing=False)  # rows replaced by the adapter's
        model = PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload()
    return cast("PreTrainedModel", model)  # merge_and_unload hands back the transformers model it wrapped


def peft_merged_logits(
    base_dir: str | Path,
    adapter_dirs: Sequence[str | Path],
    input_ids: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Logits [B, T, V] of :func:`peft_merged_model` for ``input_ids``."""
    with torch.no_grad():
        return peft_merged_model(base_dir, adapter_dirs, dtype=dtype)(input_ids).logits


def model_logits(model_dir: str | Path, input_ids: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits [B, T, V] of any HF causal-LM folder loaded by transformers in ``dtype``
    (raises what from_pretrained raises on a broken folder)."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)(input_ids).logits


# One unit in the last place, relative: the most a single rounding to a dtype moves a value.
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-22}


@dataclasses.dataclass
class OracleCheck:
    """Logits of a merged model against PEFT's: the largest difference, the tolerance it must stay within, and how
    far the merge moved the base's logits (which must dwarf the tolerance, or the comparison proves nothing)."""

    max_diff: float
    tolerance: float
    moved: float

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance and self.moved > 10 * self.tolerance


def check_against_peft(
    merged_dir: str | Path,
    base_dir: str | Path,
    adapter_dirs: Sequence[str | Path],
    dtype: torch.dtype,
    *,
    seed: int = 0,
) -> OracleCheck:
    """Compare the logits of ``merged_dir`` (weights in ``dtype``) with PEFT's merge_and_unload() of the same inputs
    cast to ``dtype``, both run in fp32 on the same random token ids.

    A merge that rounds once may differ from PEFT's in the last bit of a few weights (fp32 summation order), which
    moves a logit by at most about two ulps of the largest logit: that is the tolerance.
    """
    ref = peft_merged_model(base_dir, adapter_dirs, dtype=torch.float32)
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref_logits = cast(torch.nn.Module, ref).to(dtype).float()(ids).logits  # transformers types .to oddly
    got = model_logits(merged_dir, ids)
    base_vocab = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    base_ids = ids % base_vocab
    moved = (model_logits(merged_dir, base_ids)[..., :base_vocab] - model_logits(base_dir, base_ids)).abs().max()
    return OracleCheck(
        float((got - ref_logits).abs().max()), 2 * ULP[dtype] * float(ref_logits.abs().max()), float(moved)
    )
