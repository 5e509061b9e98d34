"""The model families beyond LLaMA-1, each as data (hubmerge/data/architectures/*.json): the tables against
transformers' own models, the merge against PEFT's merge_and_unload() for each family (Mistral with GQA and sliding
window, Qwen2 with biases / tied / padded embedding rows, Gemma with head_dim != hidden / heads, a Llama 3
rope-scaled base with an extended vocabulary), tied embeddings replaced or untied, rope scaling carried to config.json
and to GGUF, and GGUF read back with the gguf package and compared key by key with what llama.cpp's
convert_hf_to_gguf.py writes for the same HF folder (its rules written out here, independently of the tables)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from support import hf_tensors, meta_to_hf_permute

import hubmerge
from hubmerge.errors import IncompatibleError, InputError
from hubmerge.model import architectures
from hubmerge.testing import tinymodels as tm

gguf = pytest.importorskip("gguf")

LINEAR = tm.LLAMA_LINEAR
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Tiny bases of each family: what makes the family different from LLaMA-1 is exercised by each.
FAMILIES = {
    "mistral": dict(family="mistral", heads=4, kv_heads=2, sliding_window=16),
    "qwen2": dict(family="qwen2", heads=4, kv_heads=2, tokenizer="bpe", vocab_rows=320, tie_word_embeddings=True),
    "gemma": dict(family="gemma", heads=4, kv_heads=1, head_dim=32, tie_word_embeddings=True),
    "qwen2-sentencepiece": dict(family="qwen2", heads=4, kv_heads=2, vocab_rows=264),
    "llama3": dict(heads=4, kv_heads=2, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, max_position_embeddings=131072),
}


def _quiet_peft_model(base, adapters):
    return tm.peft_merged_model(base, adapters, dtype=torch.float32)


def assert_matches_peft_saved(out_hf, base, adapters, dtype, tmp_path, *, saved: bool = True) -> None:
    """The oracle for every family: PEFT's merge_and_unload() of the same inputs, as the files its save_pretrained()
    writes (``saved``: what a PEFT user gets, e.g. a tied head follows a replaced embed_tokens) or as the merged model
    in memory (an untied head). Tensors equal after the one cast to ``dtype`` (within one ulp, bit-identical almost
    everywhere); logits of both folders loaded by transformers within two ulps of the largest logit, and the merge
    must move them by ten times more."""
    ref = _quiet_peft_model(base, adapters)
    ref_dir = tmp_path / "peft-merged"
    if saved:
        ref.to(dtype).save_pretrained(ref_dir)
        want_tensors = hf_tensors(ref_dir)
    else:
        want_tensors = {n: t.to(dtype) for n, t in ref.state_dict().items()}
    ours = hf_tensors(out_hf)
    assert set(ours) == set(want_tensors), set(ours) ^ set(want_tensors)
    differing = 0
    for name, want in want_tensors.items():
        got = ours[name]
        assert got.dtype == dtype, (name, got.dtype)
        torch.testing.assert_close(got.float(), want.float(), rtol=tm.ULP[dtype], atol=1e-7, msg=name)
        differing += int((got != want).sum())
    assert differing <= 1e-3 * sum(t.numel() for t in ours.values()), differing
    vocab = json.loads((out_hf / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_logits = tm.model_logits(ref_dir, ids) if saved else ref.to(dtype).float()(ids).logits
    got_logits = tm.model_logits(out_hf, ids)
    base_vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    base_ids = ids % base_vocab
    moved = (tm.model_logits(out_hf, base_ids)[..., :base_vocab] - tm.model_logits(base, base_ids)).abs().max()
    tolerance = 2 * tm.ULP[dtype] * float(want_logits.abs().max())
    assert float((got_logits - want_logits).abs().max()) <= tolerance
    assert float(moved) > 10 * tolerance


# ------------------------------------------------------------------------------------------------------ the tables


def _meta_model(model_type: str, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=80,
        **kw,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return json.loads(config.to_json_string()), model


VARIANTS = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("mistral", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen2", {"tie_word_embeddings": False}),
    ("gemma", {"head_dim": 24}),
]


@pytest.mark.parametrize("model_type,kw", VARIANTS, ids=[f"{t}-{'-'.join(k) or 'plain'}" for t, k in VARIANTS])
def test_table_matches_transformers(model_type, kw):
    """Names (in save order), shapes and LoRA targets of each table equal transformers' model of the same config;
    the GGUF names equal the gguf package's own map for llama.cpp's arch."""
    config, model = _meta_model(model_type, **kw)
    arch = architectures.families()[model_type]
    state = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        del state["lm_head.weight"]  # transformers saves a tied head once, as embed_tokens
    assert arch.tensor_names(config) == list(state)
    assert arch.tensor_shapes(config, 96) == state
    layers = (torch.nn.Linear, torch.nn.Embedding)
    leaf_modules = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, layers)}
    assert arch.lora_modules == leaf_modules
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf.arch.upper()], 2)
    for name in state:
        if name == "lm_head.weight" and model_type == "gemma":
            assert arch.gguf_name(name) is None  # llama.cpp's gemma arch has no output matrix
            continue
        assert arch.gguf_name(name) == names.get_name(name, try_suffixes=(".weight", ".bias"))
    known = {
        value
        for group in vars(gguf.Keys).values()
        if isinstance(group, type)
        for key, value in vars(group).items()
        if not key.startswith("_") and isinstance(value, str)
    }
    for item in arch.gguf.metadata:
        assert item["key"] in known, item["key"]


def test_unknown_family_is_one_line_naming_the_supported_ones(models, tmp_path):
    base = models.copy(models.base(), "gpt2-family")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(InputError) as info:
        hubmerge.merge([models.adapter(models.base(), seed=26)], base, tmp_path / "out", progress=False)
    message = str(info.value)
    assert "\n" not in message and "'gpt_neox' is not supported" in message
    for family in architectures.families().values():
        assert f"{family.name} ({family.model_type!r})" in message
    assert "hubmerge/data/architectures/" in message


# ------------------------------------------------------------------------------------------------ PEFT per family


@pytest.fixture(scope="module")
def family_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: tm.make_base(root / name, **kw) for name, kw in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_matches_peft_for_each_family(family_bases, tmp_path, family):
    base = family_bases[family]
    kw = {"tokenizer": "llama", "modules_to_save": ("embed_tokens", "lm_head")} if family == "llama3" else {}
    adapter = tm.make_adapter(tmp_path / "adapter", base, r=8, alpha=16, target_modules=LINEAR, seed=3, **kw)
    result = hubmerge.merge([adapter], base, tmp_path / "out", progress=False)
    out = result.folders["hf"]
    assert result.plan.base.arch.model_type == json.loads((base / "config.json").read_text())["model_type"]
    assert_matches_peft_saved(out, base, [adapter], torch.float16, tmp_path)
    config, base_config = (json.loads((d / "config.json").read_text()) for d in (out, base))
    for key in ("sliding_window", "head_dim", "rope_parameters", "tie_word_embeddings", "num_key_value_heads"):
        assert config.get(key) == base_config.get(key), key
    if family == "qwen2":  # the padded rows stay: 320 rows for a 300-token tokenizer
        assert config["vocab_size"] == 320 == hf_tensors(out)["model.embed_tokens.weight"].shape[0]
        assert "model.layers.1.self_attn.k_proj.bias" in hf_tensors(out)


TIED_CASES = [
    ("qwen2", ("embed_tokens",), False),
    ("gemma", ("lm_head",), False),
    ("qwen2", ("embed_tokens",), True),
    ("gemma", ("embed_tokens", "lm_head"), True),
]


@pytest.mark.parametrize(
    "family,modules,tying", TIED_CASES, ids=[f"{f}-{'+'.join(m)}-{'tying' if t else 'plain'}" for f, m, t in TIED_CASES]
)
def test_tied_embeddings_replaced_by_modules_to_save(family_bases, tmp_path, family, modules, tying):
    """On a tied model, an adapter that trained one side unties them (PEFT's merge does: the other side keeps the
    base's matrix); one trained with PEFT's ensure_weight_tying replaces both, and the tie stays."""
    base = family_bases[family]
    adapter = tm.make_adapter(tmp_path / "adapter", base, modules_to_save=modules, ensure_weight_tying=tying, seed=4)
    out = hubmerge.merge([adapter], base, tmp_path / "out", progress=False).folders["hf"]
    tensors = hf_tensors(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tying
    assert ("lm_head.weight" in tensors) is not tying
    base_embed = hf_tensors(base)["model.embed_tokens.weight"]
    if not tying:  # exactly one side changed
        kept = "lm_head.weight" if modules == ("embed_tokens",) else "model.embed_tokens.weight"
        assert torch.equal(tensors[kept], base_embed)
    assert not torch.equal(tensors["model.embed_tokens.weight"], base_embed) or modules == ("lm_head",)
    assert_matches_peft_saved(out, base, [adapter], torch.float16, tmp_path)


def test_padded_rows_fewer_than_tokens_is_the_error(family_bases, models, tmp_path):
    base = models.copy(family_bases["qwen2"], "qwen2-short")
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    tokenizer["added_tokens"] += [
        {**tokenizer["added_tokens"][-1], "id": 300 + k, "content": f"<|extra_{k}|>"} for k in range(23)
    ]
    (base / "tokenizer.json").write_text(json.dumps(tokenizer))
    adapter = tm.make_adapter(tmp_path / "adapter", family_bases["qwen2"], seed=6)
    with pytest.raises(IncompatibleError, match="323 tokens but the base's embeddings have 320 rows"):
        hubmerge.merge([adapter], base, tmp_path / "out", progress=False)


def test_dry_run_size_is_the_plan_size(family_bases, tmp_path):
    from hubmerge.dryrun import estimate_nbytes
    from hubmerge.model.loader import open_base
    from hubmerge.plan import build_plan

    for family, base in family_bases.items():
        opened = open_base(base)
        plan = build_plan(opened, [], conversion=True)
        assert estimate_nbytes(opened.arch, opened.config, plan.vocab_size, 2) == plan.nbytes, family


def test_dry_run_of_hub_inputs_reads_the_family(family_bases, localhub, tmp_path):
    """The dry run of Hub inputs (configs only, no weights) names the family and sizes the output from its table."""
    from huggingface_hub import HfApi

    from hubmerge.model.loader import open_base
    from hubmerge.plan import build_plan
    from hubmerge.sizes import format_size

    token = localhub.add_user("carol")
    api = HfApi(endpoint=localhub.url, token=token)
    adapter = tm.make_adapter(tmp_path / "adapter", family_bases["gemma"], seed=11)
    for repo, folder in (("carol/gemma-tiny", family_bases["gemma"]), ("carol/gemma-lora", adapter)):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
    lines = hubmerge.preview(
        ["carol/gemma-lora"], "carol/gemma-tiny", token=token, endpoint=localhub.url, cache_dir=tmp_path / "cache"
    )
    assert lines[0].startswith("base: carol/gemma-tiny@") and "(Gemma, hidden 64, 2 layers" in lines[0]
    nbytes = build_plan(open_base(family_bases["gemma"]), [], conversion=True).nbytes
    assert f"about {format_size(nbytes)} " in lines[-1]
    assert not list((tmp_path / "cache").rglob("model.safetensors"))


# ----------------------------------------------------------------------------------------------------------- GGUF


def read_gguf(path):
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        data = torch.from_numpy(np.array(t.data))
        tensors[t.name] = (t.tensor_type.name, data.reshape(tuple(int(d) for d in reversed(t.shape))))
    return fields, tensors


def llamacpp_rope_freqs(config: dict) -> torch.Tensor:
    """llama.cpp's Llama 3 rope factors, computed frequency by frequency as its converter loop does."""
    rope = config["rope_parameters"]
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = 8192  # the converter reads a top-level original_max_position_embeddings, absent: its default
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def llamacpp_metadata(family: str, config: dict, vocab: int) -> dict:
    """The hyperparameter keys convert_hf_to_gguf.py writes for this family's HF folder (LlamaModel for llama and
    mistral, Qwen2Model, GemmaModel), as read back values."""
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    common = {
        "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"],
        "block_count": config["num_hidden_layers"],
        "feed_forward_length": config["intermediate_size"],
        "attention.head_count": heads,
        "attention.head_count_kv": kv,
        "attention.layer_norm_rms_epsilon": pytest.approx(config["rms_norm_eps"]),
    }
    rope = config.get("rope_parameters") or {}
    if family == "gemma":  # GemmaModel writes its own short list: no rope keys, key/value length always
        arch = "gemma"
        keys = {**common, "attention.key_length": config["head_dim"], "attention.value_length": config["head_dim"]}
    else:
        arch = "qwen2" if family.startswith("qwen2") else "llama"
        keys = {**common, "rope.freq_base": pytest.approx(rope.get("rope_theta", 10000.0))}
        if config.get("head_dim") is not None:
            keys["attention.key_length"] = keys["attention.value_length"] = config["head_dim"]
        if arch == "llama":
            keys["vocab_size"] = vocab
            keys["rope.dimension_count"] = config.get("head_dim") or config["hidden_size"] // heads
        if rope.get("rope_type") in ("linear", "yarn"):
            keys["rope.scaling.type"] = rope["rope_type"]
            keys["rope.scaling.factor"] = pytest.approx(rope["factor"])
        if rope.get("rope_type") == "yarn":
            keys["rope.scaling.original_context_length"] = rope["original_max_position_embeddings"]
    out = {f"{arch}.{k}": v for k, v in keys.items()}
    out["general.architecture"] = arch
    if family == "gemma":
        out["tokenizer.ggml.add_space_prefix"] = False
        out.update({f"tokenizer.ggml.{t}_token_id": i for t, i in (("prefix", 67), ("suffix", 69), ("middle", 68))})
        out["tokenizer.ggml.eot_token_id"] = 107  # and fsep 70, which the gguf writer has no setter for: dropped
    return out


@pytest.mark.parametrize("family", ["mistral", "gemma", "llama3", "qwen2-sentencepiece"])
def test_gguf_for_each_sentencepiece_family(family_bases, tmp_path, family):
    base = family_bases[family]
    adapter = tm.make_adapter(tmp_path / "adapter", base, seed=7)
    result = hubmerge.merge([adapter], base, tmp_path / "out", formats=["hf", "gguf"], progress=False)
    hf_dir, gguf_dir = result.folders["hf"], result.folders["gguf"]
    config = json.loads((hf_dir / "config.json").read_text())
    fields, tensors = read_gguf(gguf_dir / "model-f16.gguf")
    hf = hf_tensors(hf_dir)
    for key, want in llamacpp_metadata(family, config, result.plan.vocab_size).items():
        assert fields.get(key) == want, key
    arch = fields["general.architecture"]
    ours = {k for k in fields if k.startswith(f"{arch}.")}
    assert ours == {k for k in llamacpp_metadata(family, config, 0) if k.startswith(f"{arch}.")}
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "llama" and len(tokens) == result.plan.vocab_size
    if family == "qwen2-sentencepiece":  # 8 padded rows: unused tokens, named as llama.cpp names them
        assert tokens[256:] == [f"[PAD{i}]" for i in range(256, 264)] and set(types[256:]) == {gguf.TokenType.UNUSED}

    # Tensors: llama arch q/k back in Meta's rotary order; gemma's norms + 1 in the HF dtype, then F32; no head.
    mapped = architectures.families()[config["model_type"]]
    for name, want in hf.items():
        kind, got = tensors.pop(mapped.gguf_name(name))
        if want.dim() == 1:
            assert kind == "F32"
            want = (want + 1 if family == "gemma" else want).float()
        elif arch == "llama" and ".q_proj." in name:
            got = meta_to_hf_permute(got, config["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            got = meta_to_hf_permute(got, config["num_key_value_heads"])
        assert torch.equal(got.view(want.dtype) if kind != "F32" else got, want), name
    if family == "llama3":
        kind, freqs = tensors.pop("rope_freqs.weight")
        assert kind == "F32" and torch.equal(freqs, llamacpp_rope_freqs(config))
        assert len(set(freqs.tolist())) > 2  # the three regimes: 1, factor, and smoothed values between
    assert not tensors


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0},
        {"rope_type": "dynamic", "factor": 2.0},
    ],
    ids=["linear", "yarn", "dynamic"],
)
def test_rope_scaling_is_carried_to_config_and_gguf(tmp_path, rope):
    """Chinese-LLaMA-Alpaca-2's long-context variants scale rope: config.json keeps it as it was; GGUF writes the
    scaling keys llama.cpp reads, and refuses in one line a kind llama.cpp's converter would drop (dynamic)."""
    base = tm.make_base(tmp_path / "base", rope_scaling=rope, max_position_embeddings=16384)
    adapter = tm.make_adapter(tmp_path / "adapter", base, seed=8)
    result = hubmerge.merge([adapter], base, tmp_path / "out", progress=False)
    config = json.loads((result.folders["hf"] / "config.json").read_text())
    assert config["rope_parameters"] == json.loads((base / "config.json").read_text())["rope_parameters"]
    if rope["rope_type"] == "dynamic":
        with pytest.raises(IncompatibleError, match="rope scaling 'dynamic' has no GGUF form") as info:
            hubmerge.merge([adapter], base, tmp_path / "out-gguf", formats=["gguf"], progress=False)
        assert "\n" not in str(info.value) and not (tmp_path / "out-gguf").exists()
        return
    result = hubmerge.merge([adapter], base, tmp_path / "out-gguf", formats=["gguf"], progress=False)
    fields, _ = read_gguf(result.folders["gguf"] / "model-f16.gguf")
    for key, want in llamacpp_metadata("llama", config, result.plan.vocab_size).items():
        assert fields.get(key) == want, key
    assert fields.get("llama.rope.scaling.yarn_beta_fast") == (32.0 if rope["rope_type"] == "yarn" else None)


def test_rope_scaling_in_the_transformers_4_spelling(models, tmp_path):
    """Configs written before transformers 5 (Chinese-Alpaca-2-16K's among them) say ``rope_scaling`` with ``type``
    and a top-level ``rope_theta``: read the same way, and the output config.json keeps their spelling."""
    base = models.copy(models.base(), "rope-v4")
    config = json.loads((base / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=20000.0, max_position_embeddings=8192)
    (base / "config.json").write_text(json.dumps(config))
    adapter = models.adapter(models.base(), seed=10)
    result = hubmerge.merge([adapter], base, tmp_path / "out", formats=["hf", "gguf"], progress=False)
    out = json.loads((result.folders["hf"] / "config.json").read_text())
    assert out["rope_scaling"] == {"type": "linear", "factor": 4.0} and "rope_parameters" not in out
    fields, _ = read_gguf(result.folders["gguf"] / "model-f16.gguf")
    assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 4.0
    assert fields["llama.rope.freq_base"] == 20000.0 and fields["llama.context_length"] == 8192


def test_llama3_meta_tokenizer_is_named_not_called_damaged(models, tmp_path):
    """Llama 3's Meta release ships a tiktoken vocabulary as tokenizer.model: say so, and what to use instead."""
    import base64

    base = models.copy(models.base(), "tiktoken")
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    (base / "tokenizer.model").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="a tiktoken vocabulary .*Hugging Face conversion") as info:
        hubmerge.merge([models.adapter(models.base(), seed=26)], base, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value) and info.value.path == base / "tokenizer.model"


def test_refusals_are_one_line(family_bases, tmp_path):
    """pth is LLaMA-only; GGUF of a BPE tokenizer.json (Qwen2 here) is refused rather than guessed; both before
    anything is written."""
    cases = [("mistral", "pth", "LLaMA-only"), ("qwen2", "gguf", "BPE tokenizer.json"), ("llama3", "pth", "rope")]
    for family, fmt, words in cases:
        adapter = tm.make_adapter(tmp_path / f"adapter-{family}", family_bases[family], seed=9)
        out = tmp_path / f"out-{family}-{fmt}"
        with pytest.raises(IncompatibleError, match=words) as info:
            hubmerge.merge([adapter], family_bases[family], out, formats=[fmt], progress=False)
        assert "\n" not in str(info.value) and not out.exists() and info.value.remedy == "format"
