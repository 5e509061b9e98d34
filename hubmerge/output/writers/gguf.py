"""GGUF for llama.cpp: one ``model-<type>.gguf`` file (f16, bf16 or f32, following the output dtype), written with
the ``gguf`` package (llama.cpp's own gguf-py), streaming.

Key and tensor names come from the package's tables (``MODEL_ARCH.LLAMA``, its TensorNameMap from HF names).
The header, metadata and tensor infos are written first through ``gguf.GGUFWriter`` (every size is known from the
plan), then tensor data is appended block by block with the writer's own alignment, so no tensor is held whole.
As llama.cpp's HF converter does: q/k rows go back to Meta's rotary order, 1-D tensors (norms) are stored in F32,
and the tokenizer is the full sentencepiece vocabulary (pieces, scores, piece types) plus the tokens defined on
top of it (added_tokens.json, tokenizer_config.json), with the special token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import IncompatibleError, InputError
from ...merging import Block
from ...model import layouts
from ...model.tokenizer import TokenizerInfo, load_json
from ...plan import MergePlan, dtype_name
from ...tensorio.source import Entry, StreamingTensorWriter, close_written
from . import Writer

# Output dtype -> (GGML tensor type, llama.cpp file type, file name suffix): the names gguf spells them with.
_TYPES = {
    torch.float16: ("F16", "MOSTLY_F16", "f16"),
    torch.bfloat16: ("BF16", "MOSTLY_BF16", "bf16"),
    torch.float32: ("F32", "ALL_F32", "f32"),
}
_NUMPY = {torch.float16: np.float16, torch.bfloat16: np.uint16, torch.float32: np.float32}  # numpy has no bfloat16
SPECIALS = ("bos", "eos", "unk", "pad")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise InputError("--format gguf needs the gguf package: pip install 'hubmerge[gguf]'") from None
    return gguf


def file_name(dtype: torch.dtype) -> str:
    """``model-f16.gguf``, ``model-bf16.gguf`` or ``model-f32.gguf``."""
    return f"model-{_TYPES[dtype][2]}.gguf"


@dataclass
class Vocabulary:
    """A llama.cpp ("llama", sentencepiece) vocabulary: one entry per token id."""

    tokens: list[bytes]
    scores: list[float]
    types: list[int]  # gguf.TokenType values
    special_ids: dict[str, int]  # "bos"/"eos"/"unk"/"pad" -> id, for those the tokenizer defines
    add_special: dict[str, bool]  # "bos"/"eos" -> whether tokenization adds it, when tokenizer_config.json says


def sentencepiece_vocabulary(tokenizer: TokenizerInfo) -> Vocabulary:
    """Every piece of tokenizer.model (its text, score and type: sentencepiece numbers its piece types as GGUF
    does, NORMAL 1 ... BYTE 6, and both are looked up by name here), then the added tokens in id order (score -1000,
    USER_DEFINED, or CONTROL when tokenizer_config.json marks them special). Special ids come from
    special_tokens_map.json / tokenizer_config.json when they name a token, else from the model's trainer spec."""
    gguf = _gguf()
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer.model_file.read_bytes())
    piece_type = pb.ModelProto.SentencePiece.Type
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(gguf.TokenType[piece_type.Name(p.type)]) for p in proto.pieces]

    configs = {p.name: load_json(p) for p in tokenizer.files if p.suffix == ".json" and p.name != "tokenizer.json"}
    special_added = {
        int(k)
        for k, v in (configs.get("tokenizer_config.json", {}).get("added_tokens_decoder") or {}).items()
        if isinstance(v, dict) and v.get("special")
    }
    for text, token_id in sorted(tokenizer.added.items(), key=lambda kv: kv[1]):
        tokens.append(text.encode("utf-8"))
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.CONTROL if token_id in special_added else gguf.TokenType.USER_DEFINED))

    ids = {t.decode("utf-8"): i for i, t in reversed(list(enumerate(tokens)))}
    spec = proto.trainer_spec
    special_ids: dict[str, int] = {}
    for typ, fallback in zip(SPECIALS, (spec.bos_id, spec.eos_id, spec.unk_id, spec.pad_id)):
        named = None
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            entry = configs.get(name, {}).get(f"{typ}_token")
            named = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(named, str):
                break
        if isinstance(named, str) and named in ids:
            special_ids[typ] = ids[named]
        elif 0 <= fallback < len(tokens):
            special_ids[typ] = fallback
    add_special = {
        typ: configs["tokenizer_config.json"][f"add_{typ}_token"]
        for typ in ("bos", "eos")
        if isinstance(configs.get("tokenizer_config.json", {}).get(f"add_{typ}_token"), bool)
    }
    return Vocabulary(tokens, scores, types, special_ids, add_special)


class _DataStream(StreamingTensorWriter):
    """Appends the tensor data section to an open GGUF file: each tensor starts at the file's alignment."""

    def __init__(self, path: Path, entries: Sequence[Entry], file, alignment: int):
        super().__init__(path, entries)
        self._file, self._alignment = file, alignment

    def _begin(self, index: int) -> None:
        self._file.write(b"\0" * (-self._file.tell() % self._alignment))

    def _put(self, data: memoryview) -> None:
        self._file.write(data)

    def _finish(self, index: int) -> None:
        self._begin(index)  # pad the tensor's end, as GGUFWriter does: offsets were computed padded

    def _close(self, complete: bool) -> None:
        close_written(self._file, complete)


@dataclass
class _Tensor:
    dtype: torch.dtype
    head_dim: int | None  # q/k: rows go back to Meta's rotary order


class GGUFOutput(Writer):
    """Writes ``model-<type>.gguf`` into ``folder``."""

    def __init__(self, folder: Path, plan: MergePlan):
        gguf = _gguf()
        self.folder, self.plan = Path(folder), plan
        if plan.dtype not in _TYPES:
            raise IncompatibleError(
                f"GGUF output in {dtype_name(plan.dtype)} is not supported; use --dtype float16, bfloat16 or float32"
            )
        if plan.tokenizer.model_file is None:
            raise IncompatibleError(
                f"{plan.tokenizer.folder}: the gguf format needs tokenizer.model (a sentencepiece "
                "vocabulary); this tokenizer has only tokenizer.json: use --format hf"
            )
        config = plan.config
        rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
        if (rope.get("rope_type") or rope.get("type") or "default") != "default":
            raise IncompatibleError(f"rope scaling {rope!r} is not written to GGUF by hubmerge; use --format hf")
        vocab = sentencepiece_vocabulary(plan.tokenizer)
        if len(vocab.tokens) != plan.vocab_size:
            raise IncompatibleError(
                f"{plan.tokenizer.model_file}: {len(vocab.tokens)} tokens for {plan.vocab_size} "
                "embedding rows; use the tokenizer published with the model"
            )
        qtype, ftype, _ = _TYPES[plan.dtype]
        arch = gguf.MODEL_ARCH.LLAMA
        names = gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))
        self._tensors: list[_Tensor] = []
        entries: list[Entry] = []
        writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
        for t in plan.tensors:
            name = names.get_name(t.name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise IncompatibleError(f"{t.name} has no llama.cpp name; use --format hf")
            dtype = torch.float32 if len(t.shape) <= 1 else plan.out_dtype(t)
            if dtype not in _TYPES:
                raise IncompatibleError(f"{t.name} is {dtype_name(dtype)}, which GGUF output does not support")
            entry = Entry(name, dtype, t.shape)
            writer.add_tensor_info(
                name,
                t.shape,
                np.dtype(_NUMPY[dtype]),
                entry.nbytes,
                raw_dtype=gguf.GGMLQuantizationType[_TYPES[dtype][0]],
            )
            entries.append(entry)
            heads = layouts.rotary_head_count(t.name, config)
            self._tensors.append(_Tensor(dtype, plan.base.head_dim if heads else None))
        self._metadata(writer, gguf, vocab, gguf.LlamaFileType[ftype])
        self.path = self.folder / file_name(plan.dtype)
        self.folder.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file(path=self.path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        self._stream = _DataStream(self.path, entries, writer.fout[0], writer.data_alignment)

    def _metadata(self, writer, gguf, vocab: Vocabulary, ftype) -> None:
        """llama.cpp's llama hyperparameters and tokenizer keys, through the writer's own setters."""
        c, base = self.plan.config, self.plan.base
        writer.add_type(gguf.GGUFType.MODEL)
        label = self.plan.adapters[-1].label if self.plan.adapters else str(base.path)
        writer.add_name(Path(label.rstrip("/")).name or label)
        writer.add_context_length(int(c.get("max_position_embeddings") or 2048))
        writer.add_embedding_length(base.hidden_size)
        writer.add_block_count(int(c["num_hidden_layers"]))
        writer.add_feed_forward_length(int(c["intermediate_size"]))
        writer.add_head_count(base.num_heads)
        writer.add_head_count_kv(base.num_kv_heads)
        writer.add_rope_dimension_count(base.head_dim)
        if c.get("head_dim"):
            writer.add_key_length(base.head_dim)
            writer.add_value_length(base.head_dim)
        writer.add_rope_freq_base(layouts.rope_theta(c))
        writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(self.plan.vocab_size)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocab.tokens)
        writer.add_token_scores(vocab.scores)
        writer.add_token_types(vocab.types)
        for typ, token_id in vocab.special_ids.items():
            getattr(writer, f"add_{typ}_token_id")(token_id)
        for typ, flag in vocab.add_special.items():
            getattr(writer, f"add_add_{typ}_token")(flag)

    def write(self, block: Block) -> None:
        t = self._tensors[block.index]
        data = block.data
        if t.head_dim is not None:  # llama.cpp keeps q/k in Meta's rotary order (its HF converter permutes back)
            data = layouts.hf_to_meta_rows(data, t.head_dim)
        self._stream.write(data if data.dtype == t.dtype else data.to(t.dtype))

    def close(self) -> list[Path]:
        self._stream.close()
        return [self.path]

    def describe(self) -> dict:
        return {"file": self.path.name, "type": _TYPES[self.plan.dtype][2]}

    def abort(self) -> None:
        self._stream.abort()
