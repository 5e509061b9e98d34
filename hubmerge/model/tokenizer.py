"""Tokenizer files: which ones travel with a model, and how many token ids they define.

The count is what must equal the merged embedding's rows. It comes from ``tokenizer.model`` (sentencepiece) plus
ids defined on top of it (``added_tokens.json``, ``tokenizer_config.json``'s ``added_tokens_decoder``), or from
``tokenizer.json`` when there is no sentencepiece model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..jsonio import json_field, load_json
from ..verification.hashing import file_digest

# Files copied into an HF output, in the order they are looked for. The first two carry the vocabulary.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
VOCAB_FILES = TOKENIZER_FILES[:2]
# tiktoken's text format, which Llama 3's Meta release ships as tokenizer.model: "<base64 token> <rank>" lines.
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+\r?\n")
CONFIG_ONLY_FILES = ("tokenizer_config.json", "special_tokens_map.json")


@dataclass
class TokenizerInfo:
    """The tokenizer found in ``folder``: its files, its size (number of token ids) and its pieces' count."""

    folder: Path
    files: list[Path]
    size: int
    sp_size: int | None = None  # pieces in tokenizer.model, when there is one
    added: dict[str, int] = field(default_factory=dict)  # tokens defined on top of the base vocabulary

    @property
    def model_file(self) -> Path | None:
        path = self.folder / "tokenizer.model"
        return path if path in self.files else None

    def sha256(self) -> str | None:
        """SHA256 of tokenizer.model (what the known-hash table identifies), or None."""
        if self.model_file is None:
            return None
        return file_digest(self.model_file)


def read_tokenizer(folder: Path) -> TokenizerInfo | None:
    """Describe the tokenizer in ``folder``.

    Returns:
        a :class:`TokenizerInfo`, or None when the folder has neither ``tokenizer.model`` nor ``tokenizer.json``.
    Raises:
        InputError: a tokenizer file is unreadable, or added token ids leave gaps.
    """
    folder = Path(folder)
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    names = {p.name for p in files}
    if not names & set(VOCAB_FILES):
        return None
    ids: dict[str, int] = {}
    sp_size = None
    if "tokenizer.model" in names:
        import sentencepiece

        path = folder / "tokenizer.model"
        if path.stat().st_size > _MAX_SP_MODEL:
            raise InputError(
                f"{path}: larger than {_MAX_SP_MODEL >> 20} MiB, far beyond any real sentencepiece model; "
                "use the tokenizer.model published with this model"
            )
        data = path.read_bytes()
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except Exception:  # sentencepiece raises bare RuntimeError/OSError variants
            if _TIKTOKEN_LINE.match(data[:256]):
                raise InputError(
                    f"{path}: a tiktoken vocabulary (Llama 3's Meta release), not a sentencepiece model; use the "
                    "Hugging Face conversion of the model (config.json, safetensors, tokenizer.json)",
                    path=path,
                ) from None
            raise InputError(
                f"{path}: not a sentencepiece model (damaged or wrong file); "
                "use the tokenizer.model published with this model",
                path=path,
            ) from None
        sp_size = sp.get_piece_size()
        base_size = sp_size
    else:
        path = folder / "tokenizer.json"
        doc = load_json(path)
        vocab = json_field(json_field(doc, "model", dict, path, {}), "vocab", (dict, list), path, {})
        base_size = len(vocab)
        if isinstance(vocab, dict) and vocab:
            base_size = max(_token_id(i, path) for i in vocab.values()) + 1
        for tok in json_field(doc, "added_tokens", list, path, []):
            if not isinstance(tok, dict):
                raise InputError(f"{path}: an added_tokens entry is not an object; restore the original file")
            ids[str(tok.get("content"))[:1000]] = _token_id(tok.get("id"), path)
    if "added_tokens.json" in names:
        path = folder / "added_tokens.json"
        ids.update({k: _token_id(v, path) for k, v in load_json(path).items()})
    if "tokenizer_config.json" in names:
        path = folder / "tokenizer_config.json"
        decoder = json_field(load_json(path), "added_tokens_decoder", dict, path, {})
        ids.update(
            {str(v.get("content"))[:1000]: _token_id(k, path) for k, v in decoder.items() if isinstance(v, dict)}
        )
    added = {tok: i for tok, i in ids.items() if i >= base_size}
    extra = sorted(set(added.values()))
    if extra and extra != list(range(base_size, base_size + len(extra))):
        raise InputError(
            f"{folder}: added token ids {extra[:5]}... do not follow the vocabulary ({base_size}) "
            "without gaps; fix added_tokens.json"
        )
    return TokenizerInfo(folder, files, base_size + len(extra), sp_size, added)


_MAX_SP_MODEL = 64 << 20  # real ones are 0.5-5 MB
_MAX_TOKENS = 1 << 24  # 16M ids: 60x the largest real vocabularies, and far below an embedding nobody could store


def _token_id(value: object, path: Path) -> int:
    """A token id from a tokenizer file: a non-negative integer (or its decimal string, as JSON object keys are)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10:
        value = int(value)
    if type(value) is not int or not 0 <= value < _MAX_TOKENS:
        raise InputError(
            f"{path}: token id {str(value)[:40]!r} is not an id below {_MAX_TOKENS}; restore the original file"
        )
    return value
