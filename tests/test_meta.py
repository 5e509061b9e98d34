"""The Meta checkpoint as an input: ``hubmerge convert`` and a Meta-format ``--base``.

Meta checkpoints are built here by hand from the facts in docs/formats.md (split rules, params.json, checklists), not
with hubmerge's writer, and the converted model is checked against a reference forward pass of Meta's LLaMA written
in this file (RMSNorm, rotary embeddings in Meta's complex-pair convention, attention with GQA repeat, SwiGLU).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import cli, hf_tensors, meta_to_hf_permute, no_partial_left

import hubmerge
from hubmerge import VerificationError, convert
from hubmerge.model.meta import open_meta
from hubmerge.testing import tinymodels as tm

SPLIT_DIM1 = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_meta(
    root: Path,
    *,
    shards: int,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 8,
    n_kv_heads: int | None = None,
    multiple_of: int = 32,
    ffn_dim_multiplier: float | None = None,
    norm_eps: float = 1e-6,
    rope_theta: float | None = None,
    seed: int = 0,
) -> tuple[Path, dict, dict]:
    """A Meta release in miniature: ``root/tokenizer.model`` + ``tokenizer_checklist.chk``, and ``root/model`` with
    the consolidated shards (rope.freqs included, as in LLaMA-1), params.json and checklist.chk.

    Returns (model folder, full Meta-layout weights, params).
    """
    tokenizer_src = tm.make_tokenizer(root / "tok-src")
    vocab = tm.sp_size(tokenizer_src / "tokenizer.model")
    kv = n_kv_heads or n_heads
    head_dim = dim // n_heads
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier:
        hidden = int(ffn_dim_multiplier * hidden)
    inter = multiple_of * math.ceil(hidden / multiple_of)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        std = scale if scale is not None else shape[-1] ** -0.5
        return (std * torch.randn(shape, generator=gen)).half()

    weights = {"tok_embeddings.weight": rand(vocab, dim, scale=1.0)}
    for i in range(n_layers):
        p = f"layers.{i}."
        weights.update(
            {
                p + "attention.wq.weight": rand(n_heads * head_dim, dim),
                p + "attention.wk.weight": rand(kv * head_dim, dim),
                p + "attention.wv.weight": rand(kv * head_dim, dim),
                p + "attention.wo.weight": rand(dim, dim),
                p + "feed_forward.w1.weight": rand(inter, dim),
                p + "feed_forward.w2.weight": rand(dim, inter),
                p + "feed_forward.w3.weight": rand(inter, dim),
                p + "attention_norm.weight": (1 + 0.1 * torch.randn(dim, generator=gen)).half(),
                p + "ffn_norm.weight": (1 + 0.1 * torch.randn(dim, generator=gen)).half(),
            }
        )
    weights["norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=gen)).half()
    weights["output.weight"] = rand(vocab, dim)
    theta = rope_theta or 10000.0
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)

    folder = root / "model"
    folder.mkdir(parents=True)
    for k in range(shards):
        shard = {}
        for name, w in weights.items():
            if w.dim() == 1:
                shard[name] = w.clone()
            else:
                axis = 1 if name.endswith(SPLIT_DIM1) else 0
                shard[name] = torch.chunk(w, shards, dim=axis)[k].clone()
        shard["rope.freqs"] = freqs.clone()
        torch.save(shard, folder / f"consolidated.{k:02d}.pth")
    params = {
        "dim": dim,
        "multiple_of": multiple_of,
        "n_heads": n_heads,
        "n_layers": n_layers,
        "norm_eps": norm_eps,
        "vocab_size": -1,
    }
    if n_kv_heads:
        params["n_kv_heads"] = n_kv_heads
    if ffn_dim_multiplier:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    if rope_theta:
        params["rope_theta"] = rope_theta
    (folder / "params.json").write_text(json.dumps(params))
    names = [f"consolidated.{k:02d}.pth" for k in range(shards)] + ["params.json"]
    (folder / "checklist.chk").write_text("".join(f"{_md5(folder / n)}  {n}\n" for n in names))
    shutil.copyfile(tokenizer_src / "tokenizer.model", root / "tokenizer.model")
    (root / "tokenizer_checklist.chk").write_text(f"{_md5(root / 'tokenizer.model')}  tokenizer.model\n")
    return folder, weights, params


# --------------------------------------------------------------------------------- reference forward pass (Meta's)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def meta_logits(weights: dict, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """LLaMA as Meta's model.py computes it, in fp32: rotary on (even, odd) pairs as complex numbers."""
    w = {k: v.float() for k, v in weights.items()}
    dim, n_heads, eps = params["dim"], params["n_heads"], params["norm_eps"]
    n_kv = params.get("n_kv_heads") or n_heads
    hd = dim // n_heads
    batch, seq = tokens.shape
    theta = params.get("rope_theta", 10000.0)
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd)
    cis = torch.polar(torch.ones(seq, hd // 2), torch.outer(torch.arange(seq).float(), freqs))
    mask = torch.full((seq, seq), float("-inf")).triu(1)

    def rotate(x):  # [B, T, H, hd]
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2))
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)

    h = w["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = _rms_norm(h, w[p + "attention_norm.weight"], eps)
        q = rotate((x @ w[p + "attention.wq.weight"].T).view(batch, seq, n_heads, hd))
        k = rotate((x @ w[p + "attention.wk.weight"].T).view(batch, seq, n_kv, hd))
        v = (x @ w[p + "attention.wv.weight"].T).view(batch, seq, n_kv, hd)
        k, v = (t.repeat_interleave(n_heads // n_kv, dim=2) for t in (k, v))  # Meta's repeat_kv
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + mask, dim=-1) @ v
        h = h + att.transpose(1, 2).reshape(batch, seq, dim) @ w[p + "attention.wo.weight"].T
        x = _rms_norm(h, w[p + "ffn_norm.weight"], eps)
        gated = torch.nn.functional.silu(x @ w[p + "feed_forward.w1.weight"].T) * (
            x @ w[p + "feed_forward.w3.weight"].T
        )
        h = h + gated @ w[p + "feed_forward.w2.weight"].T
    return _rms_norm(h, w["norm.weight"], eps) @ w["output.weight"].T


CASES = {
    "1-shard": dict(shards=1),
    "2-shards": dict(shards=2),
    "8-shards": dict(shards=8),
    "gqa-8-shards": dict(
        shards=8,
        dim=128,
        n_heads=16,
        n_kv_heads=8,
        multiple_of=64,
        ffn_dim_multiplier=1.3,
        norm_eps=1e-5,
        rope_theta=500000.0,
    ),
}


@pytest.fixture(scope="module")
def metas(tmp_path_factory):
    built: dict[str, tuple[Path, dict, dict]] = {}

    def get(name: str):
        if name not in built:
            built[name] = make_meta(tmp_path_factory.mktemp(name), **CASES[name])
        return built[name]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_matches_a_reference_forward_pass_of_the_meta_weights(metas, tmp_path, case):
    folder, weights, params = metas(case)
    result = convert(folder, tmp_path / "hf", progress=False)
    hf = result.folders["hf"]
    config = json.loads((hf / "config.json").read_text())
    assert config["vocab_size"] == 256  # from the tokenizer: params.json says -1
    assert config["num_key_value_heads"] == params.get("n_kv_heads", params["n_heads"])
    hidden = int(params.get("ffn_dim_multiplier", 1) * int(8 * params["dim"] / 3))
    assert config["intermediate_size"] == params["multiple_of"] * math.ceil(hidden / params["multiple_of"])
    assert config["rms_norm_eps"] == params["norm_eps"]
    assert sorted(p.name for p in hf.iterdir()) == [
        "config.json",
        "generation_config.json",
        "hubmerge.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    want = meta_logits(weights, params, tokens)
    got = tm.model_logits(hf, tokens)
    tolerance = 2e-5 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance)
    # The check has teeth: q in the other rotary layout (a conversion without the permute) moves the logits.
    wrong = {n: meta_to_hf_permute(w, params["n_heads"]) if n.endswith("wq.weight") else w for n, w in weights.items()}
    assert (meta_logits(wrong, params, tokens) - want).abs().max() > 100 * tolerance
    recipe = json.loads((result.out / "hubmerge.json").read_text())
    assert recipe["adapters"] == [] and set(recipe["base"]["files"]) == {
        f"consolidated.{k:02d}.pth" for k in range(CASES[case]["shards"])
    }
    assert {r.file for r in result.plan.base.checks} == set(recipe["base"]["files"]) | {
        "params.json",
        "tokenizer.model",
    }


def test_tokenizer_files_load_with_autotokenizer_and_prepend_bos(metas, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder, _, _ = metas("2-shards")
    hf = convert(folder, tmp_path / "hf", progress=False).folders["hf"]
    tok = AutoTokenizer.from_pretrained(hf)
    sp = spm.SentencePieceProcessor(model_file=str(folder.parent / "tokenizer.model"))
    text = "bada kelo mizu"
    assert tok(text).input_ids == [sp.bos_id()] + sp.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    generation = json.loads((hf / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2


@pytest.mark.parametrize("shards,kv_heads", [(1, None), (2, None), (8, None), (8, 8)])
def test_hf_to_pth_and_back_is_bit_identical(models, tmp_path, shards, kv_heads):
    base = models.base(hidden=128, heads=16, kv_heads=kv_heads) if kv_heads else models.base(hidden=64, heads=8)
    pth = convert(base, tmp_path / "pth", formats=["pth"], pth_shards=shards, progress=False).out
    assert len(list(pth.glob("consolidated.*.pth"))) == shards
    back = convert(pth, tmp_path / "hf", progress=False).folders["hf"]
    original, converted = load_file(base / "model.safetensors"), hf_tensors(back)
    assert set(converted) == set(original)
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name
    a, b = (json.loads((f / "config.json").read_text()) for f in (base, back))
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "vocab_size",
    ):
        assert a[key] == b[key], key


def test_joined_tensors_read_any_row_range(metas):
    folder, weights, params = metas("gqa-8-shards")
    base = open_meta(folder)
    full = {name: src.read() for name, src in base.tensors.items()}
    assert torch.equal(
        full["model.layers.1.self_attn.k_proj.weight"],
        meta_to_hf_permute(weights["layers.1.attention.wk.weight"], params["n_kv_heads"]),
    )
    assert torch.equal(full["model.embed_tokens.weight"], weights["tok_embeddings.weight"])
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
    ):
        rows = full[name].shape[0]
        for start, stop in ((0, 1), (3, 13), (rows - 5, rows), (7, 7)):
            assert torch.equal(base.tensors[name].read(start, stop), full[name][start:stop]), (name, start, stop)


# ------------------------------------------------------------------------------------------------- verification


def _copy_meta(metas, name: str, tmp_path: Path) -> Path:
    folder, _, _ = metas(name)
    root = tmp_path / "release"
    shutil.copytree(folder.parent, root, ignore=shutil.ignore_patterns("tok-src"))
    return root / "model"


def _run(*args):
    return cli(*args)


def test_damaged_shard_fails_its_checklist_with_one_line_naming_it(metas, tmp_path):
    folder = _copy_meta(metas, "2-shards", tmp_path)
    shard = folder / "consolidated.01.pth"
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF  # inside the last record: the zip still opens, only the digest can tell
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    done = _run("convert", folder, "--out", out)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: ") and "consolidated.01.pth" in done.stderr
    assert "checklist.chk" in done.stderr and no_partial_left(out)


def test_damaged_tokenizer_fails_the_tokenizer_checklist(metas, tmp_path):
    folder = _copy_meta(metas, "1-shard", tmp_path)
    checklist = folder.parent / "tokenizer_checklist.chk"
    checklist.write_text(f"{'0' * 32}  tokenizer.model\n")
    with pytest.raises(VerificationError, match=r"tokenizer\.model.*tokenizer_checklist\.chk"):
        convert(folder, tmp_path / "out", progress=False)
    assert no_partial_left(tmp_path / "out")


def test_no_verify_skips_the_checklists(metas, tmp_path):
    folder = _copy_meta(metas, "1-shard", tmp_path)
    (folder / "checklist.chk").write_text(f"{'0' * 32}  consolidated.00.pth\n")
    done = _run("convert", folder, "--out", tmp_path / "out", "--no-verify", "--format", "hf,gguf")
    assert done.returncode == 0, done.stderr
    assert "converted:" in done.stdout and "verified" not in done.stdout
    assert (tmp_path / "out" / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "gguf" / "model-f16.gguf").is_file()


def test_cli_convert_prints_what_it_verified(metas, tmp_path):
    folder, _, _ = metas("2-shards")
    done = _run("convert", folder, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "verified 4 files:" in done.stdout and "consolidated.01.pth" in done.stdout
    assert "converted:" in done.stdout and "B/s" in done.stderr


@pytest.fixture
def tiny_release(monkeypatch):
    """Pretend the known-hash table knows a tiny release (the real ones are 13 GB and up): ``set_hashes`` gives the
    SHA256 the table publishes for its consolidated files."""
    import hubmerge.model.meta as meta

    table = {
        "releases": [
            {
                "name": "Tiny-LLaMA",
                "size": "tiny",
                "shards": 2,
                "vocab_size": 256,
                "max_position_embeddings": 512,
                "params": {"dim": 64, "n_layers": 2, "n_heads": 8, "norm_eps": 1e-6},
            }
        ],
        "originals": [],
    }
    monkeypatch.setattr(meta, "known_hashes", lambda: table)

    def set_hashes(*digests):
        table["originals"] = [
            {
                "name": f"Tiny-LLaMA consolidated.{k:02d}.pth",
                "file": f"consolidated.{k:02d}.pth",
                "size": "tiny",
                "sha256": d,
            }
            for k, d in enumerate(digests)
        ]

    return set_hashes


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_known_release_is_checked_against_its_published_sha256(metas, tmp_path, tiny_release):
    folder, _, _ = metas("2-shards")
    shards = sorted(folder.glob("consolidated.*.pth"))
    tiny_release(_sha(shards[0]), "f" * 64)
    with pytest.raises(VerificationError, match=r"consolidated\.01\.pth: SHA256 .* published Tiny-LLaMA"):
        convert(folder, tmp_path / "bad", progress=False)
    tiny_release(*map(_sha, shards))
    result = convert(folder, tmp_path / "good", progress=False)
    assert json.loads((result.folders["hf"] / "config.json").read_text())["max_position_embeddings"] == 512
    assert [r.note for r in result.plan.base.checks if r.note.startswith("Tiny")] == [
        "Tiny-LLaMA consolidated.00.pth",
        "Tiny-LLaMA consolidated.01.pth",
    ]


def test_a_checkpoint_that_is_no_known_release_is_not_judged_by_the_table(metas, tmp_path, tiny_release):
    tiny_release("f" * 64, "f" * 64)  # wrong for every file, but these checkpoints are not Tiny-LLaMA:
    one_shard, _, _ = metas("1-shard")  # same params, another shard count
    convert(one_shard, tmp_path / "a", progress=False)
    other = _copy_meta(metas, "2-shards", tmp_path)  # same shards, another norm_eps (as Llama-2-7B vs LLaMA-7B)
    params = json.loads((other / "params.json").read_text())
    (other / "params.json").write_text(json.dumps({**params, "norm_eps": 1e-5}))
    result = convert(other, tmp_path / "b", progress=False, verify=False)
    assert json.loads((result.folders["hf"] / "config.json").read_text())["max_position_embeddings"] == 2048


# ------------------------------------------------------------------------------------------- Meta base in a merge


def test_merge_with_a_meta_base_equals_merge_with_its_hf_conversion(metas, models, tmp_path):
    folder, _, _ = metas("gqa-8-shards")
    converted = convert(folder, tmp_path / "converted", progress=False).folders["hf"]
    llama = models.adapter(
        converted, layout="2023", r=8, alpha=32, modules_to_save=("embed_tokens", "lm_head"), tokenizer="llama", seed=31
    )
    alpaca = models.adapter(
        converted, r=16, alpha=32, modules_to_save=("embed_tokens", "lm_head"), tokenizer="alpaca", seed=32
    )
    direct = hubmerge.merge([llama, alpaca], folder, tmp_path / "direct", progress=False)
    via_hf = hubmerge.merge([llama, alpaca], converted, tmp_path / "via-hf", progress=False)
    a, b = hf_tensors(direct.folders["hf"]), hf_tensors(via_hf.folders["hf"])
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert direct.plan.vocab_size == 297 and any(t.changed for t in direct.plan.tensors)
    recipe = json.loads((direct.out / "hubmerge.json").read_text())
    assert recipe["base"]["files"]["consolidated.07.pth"] == _sha(folder / "consolidated.07.pth")
    config = json.loads((direct.folders["hf"] / "config.json").read_text())
    assert config["vocab_size"] == 297 and config["rope_theta"] == 500000.0


META_GGUF = {
    "tok_embeddings": "token_embd",
    "norm": "output_norm",
    "output": "output",
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}


def test_gguf_from_a_meta_checkpoint_holds_the_meta_weights_unchanged(metas, tmp_path):
    from test_gguf import read_gguf

    folder, weights, _ = metas("gqa-8-shards")
    result = convert(folder, tmp_path / "gguf", formats=["gguf"], progress=False)
    fields, tensors = read_gguf(result.out / "model-f16.gguf")
    # the special tokens and flags an HF conversion of the same checkpoint carries
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert (fields["tokenizer.ggml.add_bos_token"], fields["tokenizer.ggml.add_eos_token"]) == (True, False)
    assert len(tensors) == len(weights)
    for name, want in weights.items():  # llama.cpp keeps Meta's rotary order: q/k come out exactly as stored
        stem = name.removesuffix(".weight")
        if stem.startswith("layers."):
            _, layer, rest = stem.split(".", 2)
            key = f"blk.{layer}.{META_GGUF[rest]}.weight"
        else:
            key = f"{META_GGUF[stem]}.weight"
        kind, got = tensors[key]
        assert torch.equal(got, want.float() if want.dim() == 1 else want), name
