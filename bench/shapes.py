"""The benchmark's model shapes and adapter recipes (plain data: importing this loads no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BASE_VOCAB = 32000
LLAMA_EXTRA = 17953  # 32000 + 17953 = 49953, Chinese-LLaMA; Alpaca adds [PAD]: 49954


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    kind: str  # tokenizer type: "llama" (49953) or "alpaca" (49954)
    r: int
    alpha: int

    @property
    def vocab(self) -> int:
        return BASE_VOCAB + LLAMA_EXTRA + (self.kind == "alpaca")


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    shard_bytes: int  # base shard limit
    adapters: tuple[AdapterSpec, ...]
    weights: str = "safetensors"  # the base's shards: "safetensors" or "bin" (torch zip, as LLaMA-1-era bases)

    def config(self) -> dict:
        """config.json as transformers 5 writes it for LlamaForCausalLM."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "dtype": "float16",
            "eos_token_id": 2,
            "head_dim": self.hidden // self.heads,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 2048,
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": False,
            "transformers_version": "5.24.0",
            "use_cache": True,
            "vocab_size": BASE_VOCAB,
        }


def input_folders(work: Path, shape: Shape) -> tuple[Path, list[Path]]:
    """Where the base and the adapters of ``shape`` live under the work folder (a base sharded other than the
    shape's default, e.g. for the hub benchmark, or in .bin shards gets a folder of its own)."""
    root = work / shape.name
    default = SHAPES[shape.name].shard_bytes == shape.shard_bytes
    base = root / ("base" if default else f"base-{shape.shard_bytes // 10**6}MB")
    if shape.weights != "safetensors":
        base = base.with_name(f"{base.name}-{shape.weights}")
    return base, [root / spec.name for spec in shape.adapters]


def result_path(folder: Path, stem: str) -> Path:
    """``folder/<stem>.json``, or ``<stem>-2.json``, ``-3``... when taken: a later run of the day keeps the earlier's."""
    path, k = folder / f"{stem}.json", 1
    while path.exists():
        k += 1
        path = folder / f"{stem}-{k}.json"
    return path


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


SHAPES = {
    # TinyLlama-1.1B's shapes: GQA with 4 kv heads.
    "1b": Shape("1b", 2048, 22, 5632, 32, 4, 10**9, (AdapterSpec("chinese-llama-lora", "llama", 8, 32),)),
    # LLaMA-7B, Plus recipe: llama-plus (r=8) then alpaca-plus (r=64), as the Chinese-Alpaca-Plus release.
    "7b": Shape(
        "7b",
        4096,
        32,
        11008,
        32,
        32,
        5 * 10**9,
        (
            AdapterSpec("chinese-llama-plus-lora", "llama", 8, 32),
            AdapterSpec("chinese-alpaca-plus-lora", "alpaca", 64, 128),
        ),
    ),
}
