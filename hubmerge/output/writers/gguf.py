"""GGUF for llama.cpp: one ``model-<type>.gguf`` file written with the ``gguf`` package (llama.cpp's own gguf-py),
streaming: f32, f16 or bf16 (following the output dtype, or named), or quantized in the same pass (q8_0, q5_1, q5_0,
q4_1, q4_0: the types the package can quantize, spelled as llama.cpp's ``--outtype``).

The family's table (:mod:`hubmerge.model.architectures`) gives llama.cpp's arch, tensor names and metadata keys.
The header, metadata and tensor infos are written first through ``gguf.GGUFWriter`` (every size is known from the
plan), then tensor data is appended block by block with the writer's own alignment, so no tensor is held whole.
As llama.cpp's HF converter does: q/k rows of the llama arch go back to Meta's rotary order, Gemma's norms are
stored plus one, 1-D tensors, norms and biases are stored in F32, a quantized type applies to every other tensor
(embeddings and output included) except that a tensor whose rows are not a whole number of quantization blocks falls
back to F16, rope scaling is written as its keys (linear, YaRN) or, for Llama 3's, as the ``rope_freqs.weight``
factors, and the tokenizer is the full sentencepiece vocabulary (pieces, scores, piece types) plus the tokens defined
on top of it (added_tokens.json, tokenizer_config.json), with the special token ids, the add_bos/add_eos flags,
``add_space_prefix`` and the chat template of the tokenizer config, and ``general.sampling.*`` from
generation_config.json: whatever an HF output of the same merge holds, whether the base was HF or Meta.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import IncompatibleError, InputError
from ...merging import Block
from ...model import layouts
from ...model.architectures import rope_parameters
from ...model.tokenizer import TokenizerInfo, load_json
from ...plan import MergePlan, dtype_name
from ...tensorio.output import OutputFile
from ...tensorio.source import Entry, StreamingTensorWriter
from .base import Writer

# llama.cpp's --outtype spelling -> (GGML tensor type, llama.cpp file type), as the gguf package names them.
TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
FLOAT_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_TORCH = {v: k for k, v in FLOAT_TYPES.items()}
_NUMPY = {torch.float16: np.float16, torch.bfloat16: np.uint16, torch.float32: np.float32}  # numpy has no bfloat16
SPECIALS = ("bos", "eos", "unk", "pad")
# generation_config.json key -> (GGUFWriter.add_sampling_<name>, value type): the keys gguf's Metadata reads.
SAMPLING = {
    "sequence": ("sequence", str),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "min_p": ("min_p", float),
    "xtc_probability": ("xtc_probability", float),
    "xtc_threshold": ("xtc_threshold", float),
    "temperature": ("temp", float),
    "penalty_last_n": ("penalty_last_n", int),
    "penalty_repeat": ("penalty_repeat", float),
    "mirostat": ("mirostat", int),
    "mirostat_tau": ("mirostat_tau", float),
    "mirostat_eta": ("mirostat_eta", float),
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise InputError("--format gguf needs the gguf package: pip install 'hubmerge[gguf]'") from None
    return gguf


def output_type(plan: MergePlan, outtype: str | None) -> str:
    """The GGUF type of ``--format gguf[:outtype]`` for ``plan``: the named one, else the output dtype's.

    Raises:
        IncompatibleError: no GGUF float type for the output dtype, or a float type other than the output dtype
            (the merged values are cast once, to --dtype: a second cast would round them again).
    """
    own = FLOAT_TYPES.get(plan.dtype)
    if outtype is None and own is None:
        raise IncompatibleError(
            f"GGUF output in {dtype_name(plan.dtype)} is not supported; use --dtype float16, bfloat16 or float32"
        )
    if outtype in _TORCH and outtype != own:
        raise IncompatibleError(
            f"gguf:{outtype} stores the merged values unrounded, but the output dtype is {dtype_name(plan.dtype)}: "
            f"add --dtype {dtype_name(_TORCH[outtype])}"
        )
    return outtype or own  # type: ignore[return-value]


def file_name(outtype: str) -> str:
    """``model-<type>.gguf``: ``model-f16.gguf``, ``model-q8_0.gguf``, ..."""
    return f"model-{outtype}.gguf"


@dataclass
class Vocabulary:
    """A llama.cpp ("llama", sentencepiece) vocabulary: one entry per token id."""

    tokens: list[bytes]
    scores: list[float]
    types: list[int]  # gguf.TokenType values
    special_ids: dict[str, int]  # "bos"/"eos"/"unk"/"pad" -> id, for those the tokenizer defines
    add_special: dict[str, bool]  # "bos"/"eos" -> whether tokenization adds it, when tokenizer_config.json says


def sentencepiece_vocabulary(tokenizer: TokenizerInfo, configs: Mapping[str, Any] | None = None) -> Vocabulary:
    """Every piece of tokenizer.model (its text, score and type: sentencepiece numbers its piece types as GGUF
    does, NORMAL 1 ... BYTE 6, and both are looked up by name here), then the added tokens in id order (score -1000,
    USER_DEFINED, or CONTROL when tokenizer_config.json marks them special). Special ids come from
    special_tokens_map.json / tokenizer_config.json (``configs`` by file name, default: the tokenizer's own) when
    they name a token, else from the model's trainer spec."""
    gguf = _gguf()
    from sentencepiece import sentencepiece_model_pb2 as pb

    if tokenizer.model_file is None:
        raise IncompatibleError(f"{tokenizer.folder}: no tokenizer.model, which the gguf format needs; use --format hf")
    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer.model_file.read_bytes())
    piece_type = pb.ModelProto.SentencePiece.Type
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(gguf.TokenType[piece_type.Name(p.type)]) for p in proto.pieces]

    if configs is None:
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

    def __init__(self, path: Path, entries: Sequence[Entry], file: OutputFile, alignment: int):
        super().__init__(path, entries)
        self._file, self._alignment = file, alignment

    def _begin(self, index: int) -> None:
        self._file.write(b"\0" * (-self._file.tell() % self._alignment))

    def _put(self, data: memoryview) -> None:
        self._file.write(data)

    def _finish(self, index: int) -> None:
        self._begin(index)  # pad the tensor's end, as GGUFWriter does: offsets were computed padded


@dataclass
class _Tensor:
    ggml: str  # stored type (GGMLQuantizationType name)
    head_dim: int | None  # q/k: rows go back to Meta's rotary order
    shift: float | None  # added to the values (Gemma's norms)


def _side_json(name: str, source: Path | dict[str, Any] | None) -> dict[str, Any]:
    if source is None:
        return {}
    doc = load_json(source) if isinstance(source, Path) else source
    if not isinstance(doc, dict):
        raise InputError(f"{source}: {name} is not a JSON object; use the file published with the model")
    return doc


def chat_template(side: Mapping[str, Path | dict[str, Any]]) -> str | list[dict[str, str]] | None:
    """The chat template an HF output carries, where transformers and llama.cpp look for it: tokenizer_config.json's
    ``chat_template`` (one template, or a list of named ones), else chat_template.jinja, else chat_template.json.

    Raises:
        InputError: a template that is neither text nor a list of {name, template} texts.
    """
    config = _side_json("tokenizer_config.json", side.get("tokenizer_config.json"))
    template: Any = config.get("chat_template")
    origin = "tokenizer_config.json"
    jinja = side.get("chat_template.jinja")
    if template is None and isinstance(jinja, Path):
        template, origin = jinja.read_text(encoding="utf-8"), str(jinja)
    elif template is None and "chat_template.json" in side:
        template = _side_json("chat_template.json", side["chat_template.json"]).get("chat_template")
        origin = "chat_template.json"
    named = isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template
    )
    if template is not None and not isinstance(template, str) and not named:
        raise InputError(f"{origin}: chat_template is neither text nor a list of named templates; fix or remove it")
    return template


def sampling(generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``general.sampling.*`` values of a generation_config.json: {GGUFWriter setter suffix: value}.

    Raises:
        InputError: a value of the wrong type.
    """
    out: dict[str, Any] = {}
    for key, (name, kind) in SAMPLING.items():
        value = generation_config.get(key)
        if value is None:
            continue
        numeric = kind is not str and isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(value, str) if kind is str else numeric and (kind is float or value == int(value))):
            raise InputError(f"generation_config.json: {key} is {value!r}, not a {kind.__name__}; fix or remove it")
        out[name] = kind(value)
    return out


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    """``rope_freqs.weight`` of Llama 3's rope scaling, as llama.cpp's converter computes it (in float32): per
    frequency pair, 1 for wavelengths under ``original / high_freq_factor``, ``factor`` over ``original /
    low_freq_factor``, and between them ``1 / ((1 - s) / factor + s)`` with ``s = (original / wavelength - low) /
    (high - low)``. The original context is the rope parameters' (llama.cpp reads a top-level key that
    transformers never writes, so it uses 8192: the same for every released Llama 3)."""
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings") or 8192)
    wavelength = 2 * math.pi / freqs
    smooth = (original / wavelength - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    scaled = torch.where(wavelength > original / low, torch.tensor(factor, dtype=torch.float32), between)
    return torch.where(wavelength < original / high, torch.tensor(1.0, dtype=torch.float32), scaled)


def rope_metadata(rope: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """The rope scaling keys llama.cpp's converter writes (``{arch}.rope.scaling.*``): ``(key, type, value)``."""
    kind = rope["rope_type"]
    keys: list[tuple[str, str, Any]] = []
    if kind in ("linear", "yarn") and rope.get("factor") is not None:
        keys += [("type", "string", kind), ("factor", "float32", float(rope["factor"]))]
    if kind == "yarn" and rope.get("factor") is not None:
        if rope.get("original_max_position_embeddings") is None:
            raise IncompatibleError(
                "YaRN rope scaling without original_max_position_embeddings cannot be written to GGUF; "
                "add it to config.json's rope parameters or use --format hf",
                remedy="format",
            )
        keys.append(("original_context_length", "uint32", int(rope["original_max_position_embeddings"])))
        attention = rope.get("attention_factor", rope.get("attn_factor"))
        for key, value in (
            ("yarn_ext_factor", rope.get("extrapolation_factor")),
            ("yarn_attn_factor", attention),
            ("yarn_beta_fast", rope.get("beta_fast")),
            ("yarn_beta_slow", rope.get("beta_slow")),
        ):
            if value is not None:
                keys.append((key, "float32", float(value)))
    return [(f"{{arch}}.rope.scaling.{key}", typ, value) for key, typ, value in keys]


class GGUFOutput(Writer):
    """Writes ``model-<type>.gguf`` into ``folder``; ``outtype`` as llama.cpp's --outtype (default: the dtype's)."""

    def __init__(self, folder: Path, plan: MergePlan, outtype: str | None = None):
        gguf = _gguf()
        self.folder, self.plan = Path(folder), plan
        arch = plan.base.arch
        if arch.gguf is None:
            raise IncompatibleError(
                f"llama.cpp has no {arch.name} architecture hubmerge can write; use --format hf", remedy="format"
            )
        self.spec = arch.gguf
        self.outtype = output_type(plan, outtype)
        if plan.tokenizer.model_file is None:
            raise IncompatibleError(
                f"{plan.tokenizer.folder}: the gguf format needs tokenizer.model (a sentencepiece vocabulary); this "
                "tokenizer is a BPE tokenizer.json, whose pre-tokenizer hubmerge cannot identify for llama.cpp: use "
                "--format hf, then llama.cpp's convert_hf_to_gguf.py",
                path=plan.tokenizer.folder,
                remedy="format",
            )
        config = plan.config
        self.rope = rope_parameters(config)
        if self.rope["rope_type"] not in ("default", *self.spec.rope_scaling):
            raise IncompatibleError(
                f"rope scaling {self.rope['rope_type']!r} has no GGUF form for llama.cpp's {self.spec.arch} arch "
                f"(it takes {', '.join(self.spec.rope_scaling) or 'none'}); use --format hf",
                remedy="format",
            )
        side = plan.side_files()
        configs = {
            name: _side_json(name, side.get(name)) for name in ("special_tokens_map.json", "tokenizer_config.json")
        }
        vocab = sentencepiece_vocabulary(plan.tokenizer, configs)
        if arch.vocab_padding:  # embedding rows beyond the tokenizer: unused "[PADn]" tokens, as llama.cpp writes
            for i in range(len(vocab.tokens), plan.vocab_size):
                vocab.tokens.append(f"[PAD{i}]".encode())
                vocab.scores.append(-1000.0)
                vocab.types.append(int(gguf.TokenType.UNUSED))
        if len(vocab.tokens) != plan.vocab_size:
            raise IncompatibleError(
                f"{plan.tokenizer.model_file}: {len(vocab.tokens)} tokens for {plan.vocab_size} "
                "embedding rows; use the tokenizer published with the model"
            )
        qtype, ftype = TYPES[self.outtype]
        self._tensors: list[_Tensor] = []
        entries: list[Entry] = []
        writer = gguf.GGUFWriter(None, self.spec.arch)
        extra = {}
        if self.rope["rope_type"] == "llama3":  # llama.cpp writes the factors first
            extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(
                self.rope, plan.base.head_dim
            )
        for name, data in extra.items():
            entries.append(self._add(writer, gguf, name, "F32", tuple(data.shape)))
        for t in plan.tensors:
            name = arch.gguf_name(t.name)
            if name is None:
                raise IncompatibleError(
                    f"{t.name} has no place in llama.cpp's {self.spec.arch} arch (e.g. an untied lm_head); "
                    "use --format hf",
                    remedy="format",
                )
            if not plan.out_dtype(t).is_floating_point:
                raise IncompatibleError(
                    f"{t.name} is {dtype_name(plan.out_dtype(t))}, which GGUF output does not support"
                )
            stored = self._stored_type(gguf, name, t.shape, qtype)
            entries.append(self._add(writer, gguf, name, stored, t.shape))
            heads = arch.rotary_heads(t.name, config)
            spec = arch.spec(t.name)
            self._tensors.append(
                _Tensor(stored, plan.base.head_dim if heads else None, spec.gguf_shift if spec else None)
            )
        self._metadata(writer, gguf, vocab, gguf.LlamaFileType[ftype], side)
        self.path = self.folder / file_name(self.outtype)
        self.folder.mkdir(parents=True, exist_ok=True)
        writer.open_output_file(self.path)
        writer.fout[0].close()
        # appended with O_DIRECT and hashed as it is written, as every output file (gguf-py only ever appends)
        out = OutputFile(self.path, direct=True)
        writer.fout = [out]
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        self._stream = _DataStream(self.path, entries, out, writer.data_alignment)
        for data in extra.values():
            self._stream.write(data)

    @staticmethod
    def _add(writer, gguf, name: str, stored: str, shape: tuple[int, ...]) -> Entry:
        """Declare a tensor stored as ``stored`` (a GGMLQuantizationType name); its entry takes the bytes the
        writer will receive: the float dtype's, or a quantized type's blocks as uint8 rows."""
        raw = gguf.GGMLQuantizationType[stored]
        if stored.lower() in _TORCH:
            dtype = _TORCH[stored.lower()]
            entry = Entry(name, dtype, shape)
            np_dtype = np.dtype(_NUMPY[dtype])
        else:
            entry = Entry(name, torch.uint8, tuple(gguf.quant_shape_to_byte_shape(shape, raw)))
            np_dtype = np.dtype(np.uint8)
        writer.add_tensor_info(name, entry.shape, np_dtype, entry.nbytes, raw_dtype=raw)
        return entry

    @staticmethod
    def _stored_type(gguf, name: str, shape: Sequence[int], qtype: str) -> str:
        """llama.cpp's converter's rule: F32 for 1-D tensors, norms and biases; the file's type for the rest, F16
        where a row is not a whole number of quantization blocks."""
        if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
            return "F32"
        block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        return qtype if shape[-1] % block == 0 else "F16"

    def _values(self) -> list[tuple[str, str, Any]]:
        """The family's metadata keys (its table's ``gguf.metadata``), then the rope scaling keys."""
        c, arch = self.plan.config, self.plan.base.arch
        dims = {**arch.dims(c), "vocab": self.plan.vocab_size}
        out = []
        for item in self.spec.metadata:
            value = item["value"]
            if isinstance(value, str):
                source, _, key = value.partition(":")
                if source == "dim":
                    value = dims[key]
                elif source == "rope":
                    value = self.rope[key]
                else:
                    value = c.get(key, item.get("default"))
            if value is not None:
                out.append((item["key"], item["type"], value))
        return out + rope_metadata(self.rope)

    def _metadata(self, writer, gguf, vocab: Vocabulary, ftype, side: Mapping[str, Path | dict[str, Any]]) -> None:
        """llama.cpp's hyperparameters of the family and the tokenizer keys, through the writer's own setters."""
        base = self.plan.base
        writer.add_type(gguf.GGUFType.MODEL)
        label = self.plan.adapters[-1].label if self.plan.adapters else str(base.path)
        writer.add_name(Path(label.rstrip("/")).name or label)
        for name, value in sampling(_side_json("generation_config.json", side.get("generation_config.json"))).items():
            getattr(writer, f"add_sampling_{name}")(value)
        for key, typ, value in self._values():
            getattr(writer, f"add_{typ}")(key.format(arch=self.spec.arch), value)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocab.tokens)
        writer.add_token_scores(vocab.scores)
        writer.add_token_types(vocab.types)
        add_prefix = _side_json("tokenizer_config.json", side.get("tokenizer_config.json")).get("add_prefix_space")
        if isinstance(add_prefix, bool):  # llama.cpp prepends a space unless told not to
            writer.add_add_space_prefix(add_prefix)
        for typ, token_id in vocab.special_ids.items():
            getattr(writer, f"add_{typ}_token_id")(token_id)
        for typ, flag in vocab.add_special.items():
            getattr(writer, f"add_add_{typ}_token")(flag)
        template = chat_template(side)
        if template is not None:
            writer.add_chat_template(template)

    def write(self, block: Block) -> None:
        t = self._tensors[block.index]
        data = block.data
        if t.head_dim is not None:  # llama.cpp keeps q/k in Meta's rotary order (its HF converter permutes back)
            data = layouts.hf_to_meta_rows(data, t.head_dim)
        if t.shift is not None:  # in the output dtype, as the converter adds it to the HF output's values
            data = data + t.shift
        if t.ggml.lower() in _TORCH:
            dtype = _TORCH[t.ggml.lower()]
            self._stream.write(data if data.dtype == dtype else data.to(dtype))
            return
        gguf = _gguf()
        # as llama.cpp's converter: f16 rows as they are, other dtypes through f32 (numpy has no bfloat16)
        rows = data.numpy() if data.dtype in (torch.float16, torch.float32) else data.float().numpy()
        self._stream.write(torch.from_numpy(gguf.quants.quantize(rows, gguf.GGMLQuantizationType[t.ggml])))

    def close(self) -> list[Path]:
        self._stream.close()
        return [self.path]

    def describe(self) -> dict:
        return {"file": self.path.name, "type": self.outtype}

    def digests(self) -> dict[Path, str]:
        """SHA256 of the GGUF file, computed while writing it (after close)."""
        return {self.path: self._stream.sha256} if self._stream.sha256 else {}

    def abort(self) -> None:
        self._stream.abort()
