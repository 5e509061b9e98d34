"""Adapter kinds beyond plain LoRA, each against its oracle, PEFT's merge_and_unload() on the same tiny real-format
files: DoRA, lora_bias, embedding LoRA, trainable token rows (also of an extended vocabulary), and their mixes with
plain LoRA adapters applied in order. What PEFT cannot merge is refused with one line."""

from __future__ import annotations

import json

import pytest
import torch
from support import assert_matches_peft, hf_tensors

import hubmerge
from hubmerge.errors import IncompatibleError, InputError
from hubmerge.merging import merge_blocks
from hubmerge.model.adapters import open_adapter
from hubmerge.model.loader import open_base
from hubmerge.plan import build_plan

DORA = {"use_dora": True, "seed": 21}


def _case(models, name):
    """(base, adapters, dtype) for one oracle case."""
    if name == "dora":
        base = models.base()
        return base, [models.adapter(base, **DORA)], None
    if name == "dora-fp32":
        base = models.base()
        return base, [models.adapter(base, **DORA)], "float32"
    if name == "dora-gqa-rslora-patterns":
        base = models.base(heads=4, kv_heads=2)
        adapter = models.adapter(
            base, use_dora=True, use_rslora=True, r=8, alpha=16, rank_pattern={"v_proj": 4}, seed=22
        )
        return base, [adapter], None
    if name == "lora-then-dora-then-lora":  # each DoRA norm is taken on what the adapters before it made
        base = models.base()
        return (
            base,
            [models.adapter(base, seed=23), models.adapter(base, **DORA), models.adapter(base, r=4, seed=24)],
            None,
        )
    if name == "plus-recipe-then-dora":
        base = models.base()
        return base, [*models.plus_recipe(base), models.adapter(base, use_dora=True, seed=25)], None
    if name == "lora-bias":
        base = models.base(attention_bias=True)
        return (
            base,
            [models.adapter(base, lora_bias=True, target_modules=("q_proj", "v_proj", "o_proj"), seed=26)],
            None,
        )
    if name == "dora-embedding":  # column norms over the whole vocabulary: a first pass over embed_tokens
        base = models.base()
        return base, [models.adapter(base, use_dora=True, target_modules=("embed_tokens", "v_proj"), seed=35)], None
    if name == "plus-recipe-then-dora-embedding":
        base = models.base()
        # trained on the extended vocabulary: its saved embedding (base_layer) replaces the Plus one, as in PEFT
        adapter = models.adapter(base, use_dora=True, target_modules=("embed_tokens",), tokenizer="alpaca", seed=38)
        return base, [*models.plus_recipe(base), adapter], None
    if name == "embedding-lora":
        base = models.base()
        return base, [models.adapter(base, target_modules=("embed_tokens", "q_proj", "down_proj"), seed=28)], None
    if name == "trainable-tokens":
        base = models.base()
        return base, [models.adapter(base, trainable_token_indices=[7, 3, 200], seed=29)], None
    if name == "trainable-tokens-dict-bf16":
        base = models.base(dtype="bfloat16")
        adapter = models.adapter(
            base, trainable_token_indices={"embed_tokens": [0, 255]}, dtype="bfloat16", use_dora=True, seed=30
        )
        return base, [adapter], None
    if name == "trainable-tokens-extended-vocab":  # the new tokens' rows trained, no whole-matrix modules_to_save
        base = models.base()
        new_ids = list(range(256, 256 + 40))
        return base, [models.adapter(base, tokenizer="llama", trainable_token_indices=new_ids, seed=31)], None
    if name == "tied-trainable-tokens":
        base = models.base(tie_word_embeddings=True)
        return base, [models.adapter(base, trainable_token_indices=[5, 6], seed=32)], None
    raise AssertionError(name)


# case -> adapter kinds its recipe must list
CASES = {
    "dora": {"dora"},
    "dora-fp32": {"dora"},
    "dora-gqa-rslora-patterns": {"dora"},
    "lora-then-dora-then-lora": {"lora", "dora"},
    "plus-recipe-then-dora": {"lora", "dora"},
    "lora-bias": {"lora", "lora_bias"},
    "dora-embedding": {"dora", "embedding_dora"},
    "plus-recipe-then-dora-embedding": {"lora", "embedding_dora"},
    "embedding-lora": {"lora", "embedding_lora"},
    "trainable-tokens": {"lora", "trainable_tokens"},
    "trainable-tokens-dict-bf16": {"dora", "trainable_tokens"},
    "trainable-tokens-extended-vocab": {"lora", "trainable_tokens"},
    "tied-trainable-tokens": {"lora", "trainable_tokens"},
}


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_kind_matches_peft(models, tmp_path, name):
    base, adapters, dtype = _case(models, name)
    result = hubmerge.merge(adapters, base, tmp_path / "out", dtype=dtype, progress=False)
    want = torch.float32 if dtype == "float32" else result.plan.base.dtype
    assert_matches_peft(result.folders["hf"], base, adapters, want)
    recipe = json.loads((result.out / "hubmerge.json").read_text())
    assert {k for a in recipe["adapters"] for k in a["kinds"]} == CASES[name]


def test_dora_is_streamed_by_row_blocks(models):
    """Blocks of a few rows (DoRA's norms are per output row) give the very bytes one whole-tensor block gives."""
    base = models.base()
    adapter = open_adapter(models.adapter(base, **DORA))
    plan = build_plan(open_base(base), [adapter])
    q = next(i for i, t in enumerate(plan.tensors) if t.name == "model.layers.0.self_attn.q_proj.weight")
    assert plan.tensors[q].terms[0].pair.variant == "dora"
    skip = set(range(len(plan.tensors))) - {q}
    whole = torch.cat([b.data.clone() for b in merge_blocks(plan, skip=skip)])
    small = [b.data.clone() for b in merge_blocks(plan, block_bytes=4 * 64 * 16, skip=skip)]
    assert len(small) == 4 and torch.equal(torch.cat(small), whole)


def test_dora_changes_row_norms_to_the_magnitudes(models, tmp_path):
    """The merged rows' norms are the adapter's magnitudes (in fp32): what DoRA means, checked without PEFT."""
    from safetensors.torch import load_file

    base = models.base()
    folder = models.adapter(base, **DORA)
    result = hubmerge.merge([folder], base, tmp_path / "out", dtype="float32", progress=False)
    merged = hf_tensors(result.folders["hf"])["model.layers.1.self_attn.v_proj.weight"]
    magnitude = load_file(folder / "adapter_model.safetensors")[
        "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    ]
    torch.testing.assert_close(torch.linalg.vector_norm(merged, dim=1), magnitude.float(), rtol=1e-5, atol=0)


def test_dora_nan_magnitude_is_refused_before_writing(models, tmp_path):
    from safetensors.torch import load_file, save_file

    base = models.base()
    folder = models.copy(models.adapter(base, **DORA), "dora-nan")
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    tensors[key][3] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(
        hubmerge.HubmergeError, match=r"dora weights of model\.layers\.0\.self_attn\.q_proj contain NaN"
    ):
        hubmerge.merge([folder], base, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _edit_config(models, source, name, **changes):
    folder = models.copy(source, name)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_refusals_name_the_file_and_the_fix(models, tmp_path):
    base = models.base()
    dora = models.adapter(base, **DORA)
    plain = models.adapter(base, seed=33)
    tokens = models.adapter(base, trainable_token_indices=[7, 3], seed=29)
    cases = [
        (
            _edit_config(models, dora, "dora-off", use_dora=False),
            InputError,
            "says use_dora=False but .* has a lora_magnitude",
        ),
        (
            _edit_config(models, plain, "dora-on", use_dora=True),
            InputError,
            "says use_dora=True but .* has no lora_magnitude",
        ),
        (
            _edit_config(models, tokens, "tokens-missing", trainable_token_indices=None),
            InputError,
            "trainable_token_indices gives None",
        ),
        (
            _edit_config(models, tokens, "tokens-short", trainable_token_indices=[7]),
            IncompatibleError,
            r"trainable_tokens \[2, 64\]",
        ),
        (
            _edit_config(models, tokens, "tokens-far", trainable_token_indices=[7, 999]),
            IncompatibleError,
            "token ids up to 999",
        ),
    ]
    for folder, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            hubmerge.merge([folder], base, tmp_path / folder.name, progress=False)
        assert "\n" not in str(caught.value) and not (tmp_path / folder.name).exists()


def test_lora_bias_on_a_base_without_biases_is_refused_like_peft(models, tmp_path):
    biased = models.base(attention_bias=True)
    adapter = models.adapter(biased, lora_bias=True, target_modules=("q_proj",), seed=34)
    plain_base = models.base()
    with pytest.raises(
        IncompatibleError, match="lora_bias on model.layers.0.self_attn.q_proj, whose base layer has no bias"
    ):
        hubmerge.merge([adapter], plain_base, tmp_path / "out", progress=False)


def test_dora_on_the_embedding_streams_in_row_blocks(models):
    """The column norms are summed over every row block first: small blocks give the bytes one block gives."""
    base = models.base()
    adapter = open_adapter(models.adapter(base, use_dora=True, target_modules=("embed_tokens", "v_proj"), seed=35))
    plan = build_plan(open_base(base), [adapter])
    assert plan.tensors[0].name == "model.embed_tokens.weight"
    assert plan.tensors[0].terms[0].pair.variant == "embedding_dora"
    skip = set(range(1, len(plan.tensors)))
    whole = torch.cat([b.data.clone() for b in merge_blocks(plan, skip=skip)])
    small = [b.data.clone() for b in merge_blocks(plan, block_bytes=4 * 64 * 16, skip=skip)]
    assert len(small) == 16 and torch.equal(torch.cat(small), whole)


def test_dry_run_and_plan_name_the_kinds(models):
    base = models.base()
    adapter = open_adapter(models.adapter(base, trainable_token_indices=[9], target_modules=("q_proj",), seed=36))
    assert adapter.kinds == ["lora", "trainable_tokens"] and adapter.scales == [4.0]
    lines = build_plan(open_base(base), [adapter]).describe()
    assert "(lora, trainable_tokens)" in lines[1] and "scale=4," in lines[1]


def test_chinese_llama2_tokenizer_is_known_and_catches_a_first_generation_mixup():
    from hubmerge.verification.known import check_tokenizer_matches, known_hashes, tokenizer_type

    entry = tokenizer_type("a3b8844863b200dfcca971db228e96ce388290dfcf72c15d7a9d2f604bac787c")
    assert entry is not None and entry["vocab_size"] == 55296 and "ymcui/Chinese-LLaMA-Alpaca-2" in entry["source"]
    first_gen = next(t["sha256"] for t in known_hashes()["tokenizers"] if t["type"] == "alpaca")
    with pytest.raises(IncompatibleError, match="needs the Chinese-LLaMA-2 / Alpaca-2 tokenizer"):
        check_tokenizer_matches("hfl/chinese-alpaca-2-lora-7b", None, first_gen, 55296)


def _long_context_adapter(models, name, **config_changes):
    """A Chinese-LLaMA-Alpaca-2 16K-style LoRA: the base's config.json beside it, with linear rope scaling 4."""
    base = models.base()
    folder = models.copy(models.adapter(base, seed=37), name)
    config = json.loads((base / "config.json").read_text())
    config.update(rope_scaling={"type": "linear", "factor": 4.0}, max_position_embeddings=8192, **config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return base, folder


def test_long_context_lora_carries_its_rope_scaling_to_the_output(models, tmp_path):
    from transformers import AutoConfig

    base, adapter = _long_context_adapter(models, "lora-16k")
    result = hubmerge.merge([adapter], base, tmp_path / "out", progress=False)
    plain = hubmerge.merge([models.adapter(base, seed=37)], base, tmp_path / "plain", progress=False)
    ours, theirs = hf_tensors(result.folders["hf"]), hf_tensors(plain.folders["hf"])  # the same weights
    assert list(ours) == list(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    config = AutoConfig.from_pretrained(result.folders["hf"])
    assert config.max_position_embeddings == 8192
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    assert "max_position_embeddings 8192" in result.plan.describe()[1]
    recipe = json.loads((result.out / "hubmerge.json").read_text())
    assert "config.json" in recipe["adapters"][0]["files"]


def test_long_context_config_of_another_model_size_is_refused(models, tmp_path):
    base, adapter = _long_context_adapter(models, "lora-16k-13b", hidden_size=5120)
    with pytest.raises(IncompatibleError, match="its config.json says hidden_size 5120 but the base has 64"):
        hubmerge.merge([adapter], base, tmp_path / "out", progress=False)
