"""Every output format read back by other tools' rules: HF through transformers and safetensors, pth through
llama.cpp's joining rules, the recipe through its own hashes."""

from __future__ import annotations

import json
import math
import zipfile

import pytest
import torch
from support import hf_tensors, meta_to_hf_permute, read_pth_like_llamacpp
from transformers import AutoModelForCausalLM, AutoTokenizer

import hubmerge
from hubmerge.verification.hashing import file_digest

HF_TO_META = {  # written out here rather than imported, so the test checks hubmerge's table
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _meta_name(hf: str) -> str:
    if hf in HF_TO_META:
        return HF_TO_META[hf]
    layer, rest = hf.removeprefix("model.layers.").split(".", 1)
    return f"layers.{layer}.{HF_TO_META[rest.removesuffix('.weight')]}.weight"


@pytest.fixture(scope="module")
def plus(models, tmp_path_factory):
    base = models.base()
    adapters = list(models.plus_recipe(base))
    out = tmp_path_factory.mktemp("plus") / "merged"
    result = hubmerge.merge(
        adapters, base, out, formats=["hf", "pth"], max_shard_size="60kB", pth_shards=2, progress=False
    )
    return base, adapters, result


def test_hf_output_loads_cleanly_with_transformers(plus, capfd):
    base, adapters, result = plus
    hf = result.folders["hf"]
    config = json.loads((hf / "config.json").read_text())
    vocab = result.plan.vocab_size
    assert vocab % 2 == 1 and config["vocab_size"] == vocab  # odd on purpose: 256 + 40 + [PAD]
    shards = sorted(hf.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    tensors = hf_tensors(hf)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    assert (hf / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
    assert (hf / "tokenizer.model").read_bytes() == (adapters[-1] / "tokenizer.model").read_bytes()
    capfd.readouterr()
    model, info = AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    report = capfd.readouterr().err  # transformers prints a LOAD REPORT table when any key is off
    assert "MISSING" not in report and "UNEXPECTED" not in report and "MISMATCH" not in report
    assert len(tokenizer) == vocab == model.get_input_embeddings().num_embeddings
    assert model.dtype == torch.float16


@pytest.mark.parametrize("shards,kv_heads", [(1, None), (2, None), (4, None), (2, 2)])
def test_pth_output_rejoins_to_hf_tensors(models, tmp_path, shards, kv_heads):
    base = models.base(heads=4, kv_heads=kv_heads)
    adapters = list(models.plus_recipe(base))
    result = hubmerge.merge(adapters, base, tmp_path / "out", formats=["hf", "pth"], pth_shards=shards, progress=False)
    pth, hf = result.folders["pth"], hf_tensors(result.folders["hf"])
    files = sorted(p.name for p in pth.iterdir())
    tokenizer = ["special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    assert files == [f"consolidated.{k:02d}.pth" for k in range(shards)] + ["params.json", *tokenizer]
    config = result.plan.config
    params = json.loads((pth / "params.json").read_text())
    assert params["dim"] == config["hidden_size"] and params["n_layers"] == config["num_hidden_layers"]
    assert params["n_heads"] == config["num_attention_heads"]
    assert params.get("n_kv_heads", params["n_heads"]) == config["num_key_value_heads"]
    assert params["vocab_size"] == result.plan.vocab_size
    assert params["norm_eps"] == config["rms_norm_eps"]
    dim, mult = params["dim"], params.get("ffn_dim_multiplier", 1)
    hidden = int(mult * int(2 * 4 * dim / 3))
    assert params["multiple_of"] * math.ceil(hidden / params["multiple_of"]) == config["intermediate_size"]

    first = torch.load(pth / "consolidated.00.pth", weights_only=True)
    out_rows = [torch.load(p, weights_only=True)["output.weight"].shape[0] for p in sorted(pth.glob("*.pth"))]
    assert sum(out_rows) == result.plan.vocab_size and max(out_rows) - min(out_rows) <= 1
    assert all(t.is_contiguous() and t.dtype == torch.float16 for t in first.values())
    joined = read_pth_like_llamacpp(pth)
    assert len(joined) == len(hf)
    for name, tensor in hf.items():
        meta = joined[_meta_name(name)]
        if ".q_proj." in name:
            meta = meta_to_hf_permute(meta, config["num_attention_heads"])
        elif ".k_proj." in name:
            meta = meta_to_hf_permute(meta, config["num_key_value_heads"])
        assert torch.equal(meta, tensor), name


def test_pth_zip_records_are_aligned_for_mmap(plus):
    _, _, result = plus
    path = result.folders["pth"] / "consolidated.00.pth"
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            raw.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(raw.read(2), "little"), int.from_bytes(raw.read(2), "little")
            if "/data/" in info.filename:
                assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0
    mapped = torch.load(path, weights_only=True, mmap=True)
    assert torch.equal(mapped["norm.weight"], torch.load(path, weights_only=True)["norm.weight"])


def test_recipe_records_inputs_and_every_file(plus):
    base, adapters, result = plus
    recipe = json.loads((result.out / "hubmerge.json").read_text())
    written = sorted(
        p.relative_to(result.out).as_posix() for p in result.out.rglob("*") if p.is_file() and p.name != "hubmerge.json"
    )
    assert sorted(recipe["files"]) == written
    for name, digest in recipe["files"].items():
        assert file_digest(result.out / name) == digest
    assert [a["layout"] for a in recipe["adapters"]] == ["2023", "current"]
    assert [a["vocab_size"] for a in recipe["adapters"]] == [296, 297]
    assert recipe["adapters"][0]["scaling"] == [4.0] and recipe["adapters"][1]["scaling"] == [2.0]
    assert recipe["adapters"][0]["files"]["adapter_model.bin"] == file_digest(adapters[0] / "adapter_model.bin")
    assert recipe["base"]["files"]["model.safetensors"] == file_digest(base / "model.safetensors")
    assert recipe["merge"]["vocab_size"] == 297 and recipe["formats"]["pth"]["shards"] == 2
    assert recipe["tools"]["torch"] == torch.__version__


def test_same_inputs_give_identical_bytes(models, tmp_path):
    base = models.base()
    adapters = list(models.plus_recipe(base))
    first = hubmerge.merge(adapters, base, tmp_path / "a", formats=["hf", "pth"], progress=False)
    second = hubmerge.merge(adapters, base, tmp_path / "b", formats=["hf", "pth"], progress=False)
    assert first.files == second.files
    assert (first.out / "hubmerge.json").read_bytes() == (second.out / "hubmerge.json").read_bytes()
