"""LLaMA tensor names and layouts as data: the HF names a config implies, the HF <-> Meta name table, how Meta
model-parallel shards split each tensor, and the rotary row permutation between the two layouts.

Templates use ``{i}`` for the layer index; :func:`match` and :func:`fill` are the only code that interprets them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

# HF LLaMA weight names. ``None`` values: present for every config; otherwise the config flag that adds them.
HF_TENSORS: dict[str, str | None] = {
    "model.embed_tokens.weight": None,
    "model.layers.{i}.self_attn.q_proj.weight": None,
    "model.layers.{i}.self_attn.k_proj.weight": None,
    "model.layers.{i}.self_attn.v_proj.weight": None,
    "model.layers.{i}.self_attn.o_proj.weight": None,
    "model.layers.{i}.mlp.gate_proj.weight": None,
    "model.layers.{i}.mlp.up_proj.weight": None,
    "model.layers.{i}.mlp.down_proj.weight": None,
    "model.layers.{i}.input_layernorm.weight": None,
    "model.layers.{i}.post_attention_layernorm.weight": None,
    "model.norm.weight": None,
    "lm_head.weight": None,
    "model.layers.{i}.self_attn.q_proj.bias": "attention_bias",
    "model.layers.{i}.self_attn.k_proj.bias": "attention_bias",
    "model.layers.{i}.self_attn.v_proj.bias": "attention_bias",
    "model.layers.{i}.self_attn.o_proj.bias": "attention_bias",
    "model.layers.{i}.mlp.gate_proj.bias": "mlp_bias",
    "model.layers.{i}.mlp.up_proj.bias": "mlp_bias",
    "model.layers.{i}.mlp.down_proj.bias": "mlp_bias",
}

# Tensors some old conversions carry that no current loader wants.
HF_DROPPED = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)
# The same in Meta checkpoints: the original LLaMA shards hold Meta's precomputed rotary frequencies.
META_DROPPED = ("rope.freqs",)

# Module names a LoRA adapter may target in a LLaMA model (the last component of the module path).
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")

# HF name -> (Meta name, model-parallel split dim or None when every shard holds a full copy).
HF_TO_META: dict[str, tuple[str, int | None]] = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
    "model.layers.{i}.self_attn.q_proj.weight": ("layers.{i}.attention.wq.weight", 0),
    "model.layers.{i}.self_attn.k_proj.weight": ("layers.{i}.attention.wk.weight", 0),
    "model.layers.{i}.self_attn.v_proj.weight": ("layers.{i}.attention.wv.weight", 0),
    "model.layers.{i}.self_attn.o_proj.weight": ("layers.{i}.attention.wo.weight", 1),
    "model.layers.{i}.mlp.gate_proj.weight": ("layers.{i}.feed_forward.w1.weight", 0),
    "model.layers.{i}.mlp.down_proj.weight": ("layers.{i}.feed_forward.w2.weight", 1),
    "model.layers.{i}.mlp.up_proj.weight": ("layers.{i}.feed_forward.w3.weight", 0),
    "model.layers.{i}.input_layernorm.weight": ("layers.{i}.attention_norm.weight", None),
    "model.layers.{i}.post_attention_layernorm.weight": ("layers.{i}.ffn_norm.weight", None),
}

# HF names whose rows are rotary-permuted between layouts, and the config key giving their head count.
ROTARY_HEADS: dict[str, str] = {
    "model.layers.{i}.self_attn.q_proj.weight": "num_attention_heads",
    "model.layers.{i}.self_attn.k_proj.weight": "num_key_value_heads",
}

_PATTERNS: dict[str, re.Pattern[str]] = {}


def match(name: str, templates) -> tuple[str, int | None] | None:
    """Find the template (from ``templates``) that ``name`` instantiates; returns ``(template, layer)`` or None."""
    for template in templates:
        pattern = _PATTERNS.get(template)
        if pattern is None:
            pattern = _PATTERNS[template] = re.compile(
                "^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$"
            )
        m = pattern.match(name)
        if m:
            return template, int(m.group(1)) if m.groups() else None
    return None


def fill(template: str, layer: int | None) -> str:
    """Instantiate a template for one layer."""
    return template.replace("{i}", str(layer)) if layer is not None else template


def hf_tensor_names(config: Mapping[str, Any]) -> list[str]:
    """Every weight name an HF LLaMA checkpoint with this config holds, in the order transformers saves them."""
    layers = int(config["num_hidden_layers"])
    names = ["model.embed_tokens.weight"]
    per_layer = [t for t, flag in HF_TENSORS.items() if "{i}" in t and (flag is None or config.get(flag))]
    for i in range(layers):
        names += [fill(t, i) for t in per_layer]
    names.append("model.norm.weight")
    if not config.get("tie_word_embeddings", False):
        names.append("lm_head.weight")
    return names


MAX_LAYERS = 1024  # the deepest released LLaMA-family models have ~130 layers


def hf_shapes(config: Mapping[str, Any], vocab: int) -> dict[str, tuple[int, ...]]:
    """The shape of every HF weight a LLaMA model of this config has (names as :func:`hf_tensor_names`), as
    transformers' LlamaForCausalLM creates them: ``head_dim`` defaults to hidden / heads, k and v have the kv heads."""
    dim, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or dim // heads)
    q, kv = heads * head_dim, int(config.get("num_key_value_heads") or heads) * head_dim
    per_module = {
        "q_proj": ((q, dim), (q,)),
        "k_proj": ((kv, dim), (kv,)),
        "v_proj": ((kv, dim), (kv,)),
        "o_proj": ((dim, q), (dim,)),
        "gate_proj": ((inter, dim), (inter,)),
        "up_proj": ((inter, dim), (inter,)),
        "down_proj": ((dim, inter), (dim,)),
        "input_layernorm": ((dim,), (dim,)),
        "post_attention_layernorm": ((dim,), (dim,)),
    }
    whole = {"model.embed_tokens.weight": (vocab, dim), "lm_head.weight": (vocab, dim), "model.norm.weight": (dim,)}
    shapes = {}
    for name in hf_tensor_names(config):
        if name in whole:
            shapes[name] = whole[name]
        else:
            module, kind = name.rsplit(".", 2)[-2:]
            shapes[name] = per_module[module][kind == "bias"]
    return shapes


def rotary_head_count(name: str, config: Mapping[str, Any]) -> int | None:
    """Head count whose rotary layout ``name``'s rows follow, or None when the tensor is not permuted."""
    found = match(name, ROTARY_HEADS)
    if found is None:
        return None
    key = ROTARY_HEADS[found[0]]
    return int(config.get(key) or config["num_attention_heads"])


def rope_theta(config: Mapping[str, Any]) -> float:
    """The rotary base of an HF config: ``rope_theta``, or transformers 5's ``rope_parameters.rope_theta``."""
    return float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def ffn_hidden_size(dim: int, multiple_of: int, multiplier: float | None = None) -> int:
    """Meta's feed-forward size formula (params.json -> intermediate_size):
    ``multiple_of * ceil(int(multiplier * int(8 * dim / 3)) / multiple_of)``; 7B: 11008, Llama-2-70B: 28672."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier:
        hidden = int(multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)


def hf_to_meta_rows(block: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder whole heads of q/k rows from HF's rotary layout to Meta's (``block`` holds whole heads)."""
    rows, cols = block.shape
    return block.reshape(rows // head_dim, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_rows(block: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`hf_to_meta_rows`."""
    rows, cols = block.shape
    return block.reshape(rows // head_dim, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
