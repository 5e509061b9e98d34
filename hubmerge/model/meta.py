"""A Meta checkpoint (the original LLaMA release layout) as a base: ``consolidated.NN.pth`` model-parallel shards,
``params.json``, ``tokenizer.model`` next to them or in the parent folder, and the ``checklist.chk`` /
``tokenizer_checklist.chk`` md5 lists the release ships.

It is verified first (checklists, and the known SHA256 of the original files when params.json says it is one of
the releases in ``data/known_hashes.json``), then every tensor is exposed under its HF name as a
:class:`JoinedTensor`: a :class:`~hubmerge.tensorio.TensorSource` that joins the shards' slices and turns q/k rows
from Meta's rotary order into HF's, one block of rows at a time, so nothing ever holds a whole tensor.
The config.json, generation_config.json and tokenizer files of an HF conversion are computed here too
(:attr:`BaseModel.generated`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError, IncompatibleError, InputError, VerificationError
from ..tensorio import TensorRef, TensorSource, read_torch_zip
from ..tensorio.source import read_rows_into
from ..verification.checklists import CheckRow, read_checklist
from ..verification.hashing import file_digests
from ..verification.known import known_hashes
from . import architectures, layouts
from .base import BaseModel, check_tensor_names
from .tokenizer import TokenizerInfo, load_json, read_tokenizer

SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")
CHECKLIST, TOKENIZER_CHECKLIST = "checklist.chk", "tokenizer_checklist.chk"
DEFAULT_CONTEXT = 2048  # LLaMA-1's; releases in the known table carry their own


def is_meta_folder(folder: Path) -> bool:
    """True for a folder holding ``consolidated.*.pth`` and no config.json (an HF folder wins, as in llama.cpp)."""
    folder = Path(folder)
    return not (folder / "config.json").is_file() and any(folder.glob("consolidated.*.pth"))


def shard_files(folder: Path) -> list[Path]:
    """``consolidated.00.pth`` ... in order; raises InputError when the numbering has a gap."""
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := SHARD_PATTERN.match(p.name)))
    numbers = [n for n, _ in found]
    if numbers != list(range(len(numbers))):
        missing = min(set(range(len(numbers) + 1)) - set(numbers))
        raise InputError(
            f"{folder}: consolidated.{missing:02d}.pth is missing (found shards {numbers}); "
            "copy every shard of the checkpoint"
        )
    return [p for _, p in found]


def read_params(folder: Path) -> dict[str, Any]:
    """Read and check ``params.json`` (Meta keys: dim, n_layers, n_heads, [n_kv_heads], norm_eps, multiple_of,
    [ffn_dim_multiplier], [rope_theta], vocab_size)."""
    path = folder / "params.json"
    if not path.is_file():
        raise InputError(
            f"{folder}: consolidated.*.pth without params.json; copy params.json from the release next to the weights"
        )
    params = load_json(path)
    for key in ("dim", "n_layers", "n_heads", "multiple_of"):
        if (
            type(params.get(key)) is not int
            or params[key] <= 0
            or (key == "n_layers" and params[key] > architectures.MAX_LAYERS)
        ):
            raise InputError(f"{path}: missing or invalid {key!r}; restore the original params.json")
    kv = params.get("n_kv_heads")
    if kv is not None and (not isinstance(kv, int) or kv <= 0 or params["n_heads"] % kv):
        raise InputError(f"{path}: n_kv_heads {kv!r} does not divide n_heads {params['n_heads']}")
    if params["dim"] % params["n_heads"] or (params["dim"] // params["n_heads"]) % 2:
        raise InputError(f"{path}: dim {params['dim']} is not n_heads x an even head size")
    for key in ("norm_eps", "ffn_dim_multiplier", "rope_theta"):
        if params.get(key) is not None and not isinstance(params[key], (int, float)):
            raise InputError(f"{path}: {key!r} is not a number; restore the original params.json")
    return params


def find_tokenizer(folder: Path) -> TokenizerInfo:
    """The tokenizer next to the weights (with its added_tokens.json), else the parent folder's tokenizer.model:
    the release layout, looked up as llama.cpp's converter does."""
    for where in (folder, folder.parent):
        if (where / "tokenizer.model").is_file():
            tok = read_tokenizer(where)
            assert tok is not None
            return tok
    raise InputError(
        f"{folder}: no tokenizer.model here or in {folder.parent}; copy the release's tokenizer.model "
        "next to the weights"
    )


# ----------------------------------------------------------------------------------------------------- verification


def identify_release(params: Mapping[str, Any], shards: int, vocab_rows: int) -> dict[str, Any] | None:
    """The known release (``releases`` in known_hashes.json) whose params.json signature, shard count and vocabulary
    this checkpoint has, or None: a fine-tune or a merge in Meta layout is not the original."""
    have = dict(params)
    have["n_kv_heads"] = params.get("n_kv_heads") or params["n_heads"]
    for release in known_hashes().get("releases", []):
        want = dict(release["params"])
        want.setdefault("n_kv_heads", want["n_heads"])
        if (
            all(_same(have.get(k), v) for k, v in want.items())
            and release["shards"] == shards
            and release["vocab_size"] == vocab_rows
        ):
            return release
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _hash(path: Path, algorithms: Sequence[str], cache: dict[Path, dict[str, str]]) -> dict[str, str]:
    have = cache.setdefault(path, {})
    todo = [a for a in algorithms if a not in have]
    if todo:
        have.update(file_digests(path, todo))
    return have


def verify_checklists(folder: Path, tokenizer_folder: Path, cache: dict[Path, dict[str, str]]) -> list[CheckRow]:
    """Check ``checklist.chk`` (next to the weights) and ``tokenizer_checklist.chk`` (next to tokenizer.model).
    SHA256 is computed in the same read as the checklist's digest, for the known-hash check and the recipe.

    Raises:
        VerificationError: a listed file is missing or its digest differs (naming the file).
    """
    rows = []
    lists = [(folder / CHECKLIST, folder)]
    if (tokenizer_folder / TOKENIZER_CHECKLIST).is_file():
        lists.append((tokenizer_folder / TOKENIZER_CHECKLIST, tokenizer_folder))
    for checklist, where in lists:
        if not checklist.is_file():
            continue
        for name, want in read_checklist(checklist, plain=True).items():
            path = where / name
            if not path.is_file():
                raise VerificationError(
                    f"{path}: listed in {checklist.name} but missing; copy every file of the "
                    "release (or pass --no-verify)"
                )
            algorithm = {32: "md5", 40: "sha1", 64: "sha256"}[len(want)]
            got = _hash(path, (algorithm, "sha256"), cache)[algorithm]
            if got != want:
                raise VerificationError(
                    f"{path}: {algorithm} {got} differs from {checklist.name} ({want}); the file "
                    "is corrupt or incomplete: download it again (or pass --no-verify)"
                )
            rows.append(CheckRow(name, want, got, "ok", checklist.name))
    return rows


def verify_originals(
    files: Sequence[Path], release: dict[str, Any] | None, cache: dict[Path, dict[str, str]]
) -> list[CheckRow]:
    """Compare each shard with the known SHA256 of that file of the identified release (``originals`` entries with
    its ``size`` and the file name). Files of checkpoints that are no known release are not judged.

    Raises:
        VerificationError: naming the file, both hashes and the fix.
    """
    if release is None:
        return []
    rows = []
    for path in files:
        entry = next(
            (e for e in known_hashes()["originals"] if e.get("size") == release["size"] and e["file"] == path.name),
            None,
        )
        if entry is None:
            continue
        got = _hash(path, ("sha256",), cache)["sha256"]
        if got != entry["sha256"]:
            raise VerificationError(
                f"{path}: SHA256 {got[:16]}... differs from the published {entry['name']} ({entry['sha256'][:16]}...),"
                f" and params.json says this is {release['name']}: the file is corrupt or altered, download it again "
                "(or pass --no-verify if it was changed on purpose)"
            )
        rows.append(CheckRow(path.name, entry["sha256"], got, "ok", entry["name"]))
    return rows


# --------------------------------------------------------------------------------------------------- joined tensors


@dataclass
class JoinedTensor:
    """One tensor of a Meta checkpoint under its HF name.

    ``parts`` are its model-parallel slices, one per shard, joined along ``split`` (0: rows, 1: columns, None: every
    shard holds the whole tensor and shard 0's is used, as llama.cpp does). With ``head_dim`` set (q and k) rows are
    reordered within each head from Meta's rotary layout to HF's, so reads are widened to whole heads.
    """

    parts: list[TensorRef]
    split: int | None
    head_dim: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    label: str

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        rows = self.shape[0]
        stop = rows if stop is None else stop
        if not self.head_dim or start >= stop:
            return self._read(start, stop)
        hd = self.head_dim
        lo, hi = start // hd * hd, min(rows, -(-stop // hd) * hd)
        block = layouts.meta_to_hf_rows(self._read(lo, hi), hd)
        return block if (lo, hi) == (start, stop) else block[start - lo : stop - lo].clone()

    def read_into(self, buffer: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return read_rows_into(self, buffer, start, stop)  # joining and permuting copy anyway

    def prefetch(self) -> None:
        for part in self.parts:
            part.prefetch()

    def _read(self, start: int, stop: int) -> torch.Tensor:
        if self.split is None:
            return self.parts[0].read(start, stop)
        if self.split == 1:  # the same rows of every slice, side by side
            return torch.cat([p.read(start, stop) for p in self.parts], dim=1)
        pieces, offset = [], 0
        for p in self.parts:
            lo, hi = max(start, offset), min(stop, offset + p.shape[0])
            if lo < hi:
                pieces.append(p.read(lo - offset, hi - offset))
            offset += p.shape[0]
        if not pieces:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _joined_shape(name: str, parts: Sequence[TensorRef], split: int | None, files: Sequence[Path]) -> tuple[int, ...]:
    shapes = [tuple(p.shape) for p in parts]
    dims = {len(s) for s in shapes}
    ok = len(dims) == 1 and len({p.dtype for p in parts}) == 1
    if ok and split is None:
        ok = len(set(shapes)) == 1
    elif ok and split is not None:
        ok = next(iter(dims)) == 2 and len({s[1 - split] for s in shapes}) == 1
    if not ok:
        listing = ", ".join(f"{f.name} {list(s)}" for f, s in zip(files, shapes))
        raise CorruptFileError(
            f"{name} has slices that cannot be joined ({listing}); the shards come from different "
            "checkpoints: copy all of them from one release"
        )
    if split is None:
        return shapes[0]
    joined = list(shapes[0])
    joined[split] = sum(s[split] for s in shapes)
    return tuple(joined)


def join_tensors(folder: Path, files: Sequence[Path], config: Mapping[str, Any]) -> dict[str, JoinedTensor]:
    """Index every shard and join each tensor's slices under its HF name, checking names and joined shapes against
    ``config``. Raises InputError / CorruptFileError naming the shard or tensor at fault."""
    shards = [read_torch_zip(f) for f in files]
    for refs in shards:
        for dropped in layouts.META_DROPPED:
            refs.pop(dropped, None)
    arch = architectures.llama()
    head_dim = arch.dims(config)["head_dim"]
    wanted: dict[str, tuple[str, int | None]] = {}
    for hf_name in arch.tensor_names(config):
        found = arch.meta_name(hf_name)
        assert found is not None  # every LLaMA tensor has a Meta name
        wanted[found[0]] = (hf_name, found[1])
    for f, refs in zip(files, shards):
        check_tensor_names(
            refs,
            list(wanted),
            unknown=f"{f}: tensor {{name}} does not belong to a LLaMA model with this params.json "
            "({count} such); the shard belongs to another model",
            missing=f"{f}: lacks {{name}} ({{count}} tensors missing); the shard is incomplete or "
            "params.json belongs to another model",
        )
    vocab = _joined_shape("tok_embeddings.weight", [s["tok_embeddings.weight"] for s in shards], 1, files)[0]
    expected = arch.tensor_shapes(config, vocab)
    tensors: dict[str, JoinedTensor] = {}
    for meta_name, (hf_name, split) in wanted.items():
        parts = [s[meta_name] for s in shards]
        shape = _joined_shape(meta_name, parts, split, files)
        if shape != expected[hf_name]:
            raise InputError(
                f"{folder}: {meta_name} joins to {list(shape)} but params.json implies "
                f"{list(expected[hf_name])}; params.json and the shards belong to different models"
            )
        rotary = arch.rotary_heads(hf_name, config) is not None
        span = f"{files[0].name}" if len(files) == 1 else f"{files[0].name}..{files[-1].name}"
        tensors[hf_name] = JoinedTensor(
            parts,
            split if len(parts) > 1 else None,
            head_dim if rotary else None,
            shape,
            parts[0].dtype,
            f"{span}:{meta_name}",
        )
    return tensors


# --------------------------------------------------------------------------------------------- config and documents


def hf_config(
    params: Mapping[str, Any], vocab_size: int, context: int, tokens: Mapping[str, int | None], dtype: torch.dtype
) -> dict[str, Any]:
    """config.json of the HF conversion (docs/formats.md: the intermediate size formula, GQA, eps, rope theta)."""
    dim, heads = params["dim"], params["n_heads"]
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": layouts.ffn_hidden_size(dim, params["multiple_of"], params.get("ffn_dim_multiplier")),
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": params.get("n_kv_heads") or heads,
        "head_dim": dim // heads,
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": float(params.get("norm_eps", 1e-6)),
        "rope_theta": float(params.get("rope_theta") or 10000.0),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "vocab_size": vocab_size,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    config.update({f"{k}_token_id": v for k, v in tokens.items() if k in ("bos", "eos", "pad") and v is not None})
    return config


def special_tokens(tokenizer: TokenizerInfo) -> tuple[dict[str, str], dict[str, int | None]]:
    """The sentencepiece model's special pieces (``{"bos_token": "<s>", ...}``) and their ids (``{"bos": 1, ...}``)."""
    import sentencepiece

    assert tokenizer.model_file is not None  # find_tokenizer only returns folders with a tokenizer.model
    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(tokenizer.model_file.read_bytes())
    found = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    ids: dict[str, int | None] = {k: (v if 0 <= v < sp.get_piece_size() else None) for k, v in found.items()}
    return {f"{k}_token": sp.id_to_piece(v) for k, v in ids.items() if v is not None}, ids


def hf_documents(tokenizer: TokenizerInfo, context: int) -> dict[str, dict[str, Any]]:
    """generation_config.json, tokenizer_config.json (LlamaTokenizer, which transformers loads from tokenizer.model
    alone) and special_tokens_map.json for the HF conversion. LLaMA prepends ``<s>``: said explicitly, because
    transformers 5 does not without ``add_bos_token``."""
    names, ids = special_tokens(tokenizer)
    return {
        "generation_config.json": {
            k: v
            for k, v in {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}.items()
            if v is not None
        },
        "tokenizer_config.json": {
            **names,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": context,
            "tokenizer_class": "LlamaTokenizer",
        },
        "special_tokens_map.json": names,
    }


# ------------------------------------------------------------------------------------------------------------- open


def open_meta(folder: Path, *, verify: bool = True) -> BaseModel:
    """Open (and first verify) a Meta checkpoint folder as a :class:`~hubmerge.model.base.BaseModel` under HF names.

    Verification (skipped with ``verify=False``): md5 (or sha) lists ``checklist.chk`` and
    ``tokenizer_checklist.chk`` when present; then, when params.json, the shard count and the vocabulary identify a
    known release, the published SHA256 of each of its consolidated files. Every digest is computed in one read per
    file and kept in ``hashes`` so the recipe does not read the file again.

    Raises:
        InputError, CorruptFileError: a missing or malformed piece (named). VerificationError: a digest differs.
        IncompatibleError: the tokenizer does not fit the embeddings.
    """
    folder = Path(folder)
    files = shard_files(folder)
    params = read_params(folder)
    tokenizer = find_tokenizer(folder)
    cache: dict[Path, dict[str, str]] = {}
    checks = verify_checklists(folder, tokenizer.folder, cache) if verify else []
    heads = params["n_heads"]
    skeleton = {
        "hidden_size": params["dim"],
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": params.get("n_kv_heads") or heads,
        "intermediate_size": layouts.ffn_hidden_size(
            params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")
        ),
    }
    tensors = join_tensors(folder, files, skeleton)
    rows = tensors["model.embed_tokens.weight"].shape[0]
    if isinstance(params.get("vocab_size"), int) and params["vocab_size"] > 0 and params["vocab_size"] != rows:
        raise IncompatibleError(
            f"{folder / 'params.json'}: vocab_size {params['vocab_size']} but tok_embeddings has "
            f"{rows} rows; restore the params.json of these weights"
        )
    if tokenizer.size != rows:
        raise IncompatibleError(
            f"{tokenizer.model_file}: the tokenizer has {tokenizer.size} tokens but the "
            f"checkpoint's tok_embeddings has {rows} rows; use the tokenizer.model published with "
            "these weights"
        )
    release = identify_release(params, len(files), rows)
    if verify:
        checks += verify_originals(files, release, cache)
    context = release["max_position_embeddings"] if release else DEFAULT_CONTEXT
    _, ids = special_tokens(tokenizer)
    config = hf_config(params, rows, context, ids, tensors["model.embed_tokens.weight"].dtype)
    hashes = {p.name: d["sha256"] for p, d in cache.items() if p in files and "sha256" in d}
    sources: dict[str, TensorSource] = dict(tensors)
    return BaseModel(
        folder, config, sources, list(files), tokenizer, [], hf_documents(tokenizer, context), hashes, checks
    )
