"""Tokenizer files: which ones travel with a model, and how many token ids they define.

The count is what must equal the merged embedding's rows. It comes from ``tokenizer.model`` (sentencepiece) plus
ids defined on top of it (``added_tokens.json``, ``tokenizer_config.json``'s ``added_tokens_decoder``), or from
``tokenizer.json`` when there is no sentencepiece model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
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


def load_json(path: Path) -> dict:
    """A JSON object from a file; InputError (naming the file) when unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); restore the original file") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object; restore the original file")
    return data


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
        data = load_json(folder / "tokenizer.json")
        vocab = data.get("model", {}).get("vocab", {})
        base_size = len(vocab)
        if isinstance(vocab, dict) and vocab:
            base_size = max(int(i) for i in vocab.values()) + 1
        for tok in data.get("added_tokens", []):
            ids[str(tok.get("content"))] = int(tok["id"])
    if "added_tokens.json" in names:
        ids.update({str(k): int(v) for k, v in load_json(folder / "added_tokens.json").items()})
    if "tokenizer_config.json" in names:
        decoder = load_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
        ids.update({str(v.get("content")): int(k) for k, v in decoder.items() if isinstance(v, dict)})
    added = {tok: i for tok, i in ids.items() if i >= base_size}
    extra = sorted(set(added.values()))
    if extra and extra != list(range(base_size, base_size + len(extra))):
        raise InputError(
            f"{folder}: added token ids {extra[:5]}... do not follow the vocabulary ({base_size}) "
            "without gaps; fix added_tokens.json"
        )
    return TokenizerInfo(folder, files, base_size + len(extra), sp_size, added)
