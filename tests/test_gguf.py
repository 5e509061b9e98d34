"""``--format gguf`` read back with the gguf package's own reader (and with llama.cpp itself when llama-cpp-python is
installed): every tensor in llama.cpp's layout, the hyperparameters and the full extended vocabulary, against the HF
output of the same merge."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from support import hf_tensors, meta_to_hf_permute

import hubmerge

gguf = pytest.importorskip("gguf")

GGUF_NAMES = {  # llama.cpp's names, written out here rather than taken from the package hubmerge uses
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TORCH = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    layer, rest = hf.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def read_gguf(path):
    """(fields as Python values, {name: (type name, tensor)}) with float tensors as torch in their stored dtype and
    shape, quantized ones as their bytes."""
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        data = torch.from_numpy(np.array(t.data))
        if kind == "BF16":
            data = data.view(torch.bfloat16)
        if kind in TORCH:  # quantized tensors stay as their blocks' bytes
            data = data.reshape(tuple(int(d) for d in reversed(t.shape)))
        tensors[t.name] = (kind, data)
    return fields, tensors


def assert_gguf_matches_hf(path, hf_folder, dtype: torch.dtype) -> dict:
    """Every tensor of the GGUF equals the HF output's (q/k taken back from llama.cpp's rotary layout, norms in
    F32); returns the GGUF's fields."""
    fields, tensors = read_gguf(path)
    config = json.loads((hf_folder / "config.json").read_text())
    hf = hf_tensors(hf_folder)
    assert set(tensors) == {gguf_name(n) for n in hf}
    for name, want in hf.items():
        kind, got = tensors[gguf_name(name)]
        if want.dim() == 1:
            assert kind == "F32" and torch.equal(got, want.float()), name
            continue
        assert TORCH[kind] == dtype == want.dtype, (name, kind)
        if ".q_proj." in name:
            got = meta_to_hf_permute(got, config["num_attention_heads"])
        elif ".k_proj." in name:
            got = meta_to_hf_permute(got, config["num_key_value_heads"])
        assert torch.equal(got, want), name
    return fields


@pytest.fixture(scope="module")
def plus(models, tmp_path_factory):
    base = models.base(heads=8, kv_heads=4)
    adapters = list(models.plus_recipe(base))
    out = tmp_path_factory.mktemp("gguf") / "merged"
    return hubmerge.merge(adapters, base, out, formats=["hf", "gguf"], progress=False)


def test_gguf_tensors_equal_the_hf_output_in_llamacpp_layout(plus):
    assert sorted(p.name for p in plus.folders["gguf"].iterdir()) == ["model-f16.gguf"]
    assert_gguf_matches_hf(plus.folders["gguf"] / "model-f16.gguf", plus.folders["hf"], torch.float16)
    recipe = json.loads((plus.out / "hubmerge.json").read_text())
    assert recipe["formats"]["gguf"] == {"folder": "gguf", "file": "model-f16.gguf", "type": "f16"}
    # hashed while it was written (with O_DIRECT): the recorded SHA256 is the file's own, read here from scratch
    data = (plus.folders["gguf"] / "model-f16.gguf").read_bytes()
    assert recipe["files"]["gguf/model-f16.gguf"] == hashlib.sha256(data).hexdigest()


def test_gguf_hyperparameters_follow_config(plus):
    fields, _ = read_gguf(plus.folders["gguf"] / "model-f16.gguf")
    config = json.loads((plus.folders["hf"] / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert fields["general.architecture"] == "llama"
    want = {
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.rope.dimension_count": head_dim,
        "llama.vocab_size": 297,
        "general.file_type": 1,
    }
    assert {k: fields[k] for k in want} == want
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    assert fields["llama.rope.freq_base"] == pytest.approx(theta)


def test_gguf_vocabulary_is_the_full_extended_tokenizer(plus):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    fields, _ = read_gguf(plus.folders["gguf"] / "model-f16.gguf")
    hf = plus.folders["hf"]
    sp = spm.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    n = sp.get_piece_size()
    assert n == 297 and fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(n)])

    def kind(i):
        for test, value in ((sp.is_unknown, 2), (sp.is_control, 3), (sp.is_byte, 6), (sp.is_unused, 5)):
            if test(i):
                return value
        return 1

    types = [kind(i) for i in range(n)]
    assert fields["tokenizer.ggml.token_type"] == types
    assert types.count(6) == 0 and types[:3] == [2, 3, 3]
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.pad_token == "[PAD]"
    assert (
        fields["tokenizer.ggml.bos_token_id"],
        fields["tokenizer.ggml.eos_token_id"],
        fields["tokenizer.ggml.unknown_token_id"],
        fields["tokenizer.ggml.padding_token_id"],
    ) == (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id)


def test_added_tokens_and_byte_pieces_get_their_types(tmp_path):
    from hubmerge.model.tokenizer import read_tokenizer
    from hubmerge.output.writers.gguf import sentencepiece_vocabulary
    from hubmerge.testing import tinymodels as tm

    folder = tm.make_tokenizer(tmp_path / "tok", base_vocab=300)  # large enough for byte fallback pieces
    (folder / "added_tokens.json").write_text(json.dumps({"<tool>": 300, "<note>": 301}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"300": {"content": "<tool>", "special": True}}
    config["pad_token"] = "<note>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    vocab = sentencepiece_vocabulary(read_tokenizer(folder))
    assert len(vocab.tokens) == 302 and vocab.tokens[300:] == [b"<tool>", b"<note>"]
    assert vocab.types[300:] == [int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)]
    assert vocab.scores[300:] == [-1000.0, -1000.0]
    assert vocab.types.count(int(gguf.TokenType.BYTE)) == 256 and vocab.tokens[3] == b"<0x00>"
    assert vocab.special_ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 301}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gguf_in_bf16_and_f32(models, tmp_path, dtype):
    base = models.base()
    adapter = models.adapter(base, seed=41)
    result = hubmerge.merge([adapter], base, tmp_path / "out", formats=["hf", "gguf"], dtype=dtype, progress=False)
    suffix = {"bfloat16": "bf16", "float32": "f32"}[dtype]
    fields = assert_gguf_matches_hf(
        result.folders["gguf"] / f"model-{suffix}.gguf", result.folders["hf"], getattr(torch, dtype)
    )
    assert fields["general.file_type"] == {"bf16": 32, "f32": 0}[suffix]


def test_llama_cpp_gives_the_logits_transformers_gives(plus):
    llama_cpp = pytest.importorskip("llama_cpp")
    from hubmerge.testing import tinymodels as tm

    ids = [1, 17, 250, 296, 5, 42, 280, 9]
    want = tm.model_logits(plus.folders["hf"], torch.tensor([ids]))[0]
    llm = llama_cpp.Llama(
        str(plus.folders["gguf"] / "model-f16.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2
    )
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    assert got.shape == want.shape
    # llama.cpp multiplies in f16 on the CPU: agreement to a few f16 ulps of the largest logit, and the same argmax.
    tolerance = 8 * 2.0**-10 * float(want.abs().max())
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=tolerance)
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(plus.folders["hf"] / "tokenizer.model"))
    text = "bada kelo \u4e00\u4e01 mizu"  # two of the pieces the adapters' tokenizer appended
    assert llm.tokenize(text.encode(), add_bos=False) == sp.encode(text)
    assert llm.n_vocab() == 297 and (llm.token_bos(), llm.token_eos()) == (1, 2)


# ---------------------------------------------------------------------------------------------- quantized types

QUANT_BITS = {"q8_0": 8, "q5_1": 5, "q5_0": 5, "q4_1": 4, "q4_0": 4}


def _hf_in_llamacpp_layout(name: str, tensor: torch.Tensor, config: dict) -> torch.Tensor:
    """An HF tensor as llama.cpp stores it: q/k rows in Meta's rotary order (the inverse of meta_to_hf_permute)."""
    heads = {".q_proj.": "num_attention_heads", ".k_proj.": "num_key_value_heads"}
    for part, key in heads.items():
        if part in name:
            n = config[key]
            rows, cols = tensor.shape
            return tensor.view(n, 2, rows // n // 2, cols).transpose(1, 2).reshape(rows, cols)
    return tensor


def _block_error_bound(want: np.ndarray, kind: str) -> np.ndarray:
    """Per element, the most a round trip through ``kind`` may move it: one quantization step of its block of 32
    (symmetric types: absmax / 2^(bits-1); with a minimum: range / (2^bits - 1)), plus the f16 rounding of the
    block's scale."""
    blocks = want.reshape(-1, 32)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    bits = QUANT_BITS[kind]
    if kind.endswith("_1"):
        step = (blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)) / (2**bits - 1)
    else:
        step = absmax / 2 ** (bits - 1)
    return np.broadcast_to(step + absmax * 2.0**-9, blocks.shape).reshape(want.shape)


@pytest.fixture(scope="module")
def quantized(models, tmp_path_factory):
    """One merge written as HF and as every quantized GGUF type in the same pass. intermediate_size 200 is not a
    multiple of 32: ffn_down's rows are not whole blocks and fall back to F16, as llama.cpp's converter does."""
    base = models.base(intermediate=200)
    adapters = [models.adapter(base, seed=51)]
    out = tmp_path_factory.mktemp("quantized") / "merged"
    formats = ["hf", *(f"gguf:{kind}" for kind in QUANT_BITS)]
    return hubmerge.merge(adapters, base, out, formats=formats, progress=False)


@pytest.mark.parametrize("kind", list(QUANT_BITS))
def test_quantized_gguf_dequantizes_to_the_hf_output_within_the_type_error(quantized, kind):
    path = quantized.folders[f"gguf:{kind}"] / f"model-{kind}.gguf"
    assert path.parent.name == "gguf" and path.is_file()
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{kind.upper()}"])
    config = json.loads((quantized.folders["hf"] / "config.json").read_text())
    hf = hf_tensors(quantized.folders["hf"])
    stored = {t.name: t for t in reader.tensors}
    assert set(stored) == {gguf_name(n) for n in hf}
    seen = set()
    for name, tensor in hf.items():
        t = stored[gguf_name(name)]
        want = _hf_in_llamacpp_layout(name, tensor, config)
        seen.add(t.tensor_type.name)
        if want.dim() == 1:  # norms: F32, exactly
            assert t.tensor_type.name == "F32" and np.array_equal(np.array(t.data), want.float().numpy()), name
            continue
        if "down_proj" in name:  # 200 columns: not whole blocks of 32, kept in F16 unchanged
            assert t.tensor_type.name == "F16" and np.array_equal(np.array(t.data), want.numpy()), name
            continue
        assert t.tensor_type.name == kind.upper(), name
        # what llama.cpp's converter writes from the HF output: the same f16 rows through the package's quantizer
        expected = gguf.quants.quantize(want.numpy(), t.tensor_type)
        assert np.array_equal(np.array(t.data), expected), name
        got = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(want.shape)
        exact = want.float().numpy()
        error = np.abs(got - exact)
        assert (error <= _block_error_bound(exact, kind)).all(), (name, float(error.max()))
        assert error.max() > 0, name  # really quantized
    assert seen == {"F32", "F16", kind.upper()}
    recipe = json.loads((quantized.out / "hubmerge.json").read_text())
    assert recipe["formats"][f"gguf:{kind}"] == {"folder": "gguf", "file": f"model-{kind}.gguf", "type": kind}


def test_q8_0_gguf_is_about_half_the_f16_size(models, tmp_path):
    base = models.base(hidden=128, heads=4)
    adapter = models.adapter(base, seed=52)
    result = hubmerge.merge([adapter], base, tmp_path / "out", formats=["gguf", "gguf:q8_0"], progress=False)
    f16 = (result.folders["gguf"] / "model-f16.gguf").stat().st_size
    q8 = (result.folders["gguf:q8_0"] / "model-q8_0.gguf").stat().st_size
    tensor_bytes = sum(t.n_bytes for t in gguf.GGUFReader(result.folders["gguf"] / "model-f16.gguf").tensors)
    assert q8 < f16 - 0.4 * tensor_bytes  # 34 bytes per 32 weights instead of 64


def test_format_spelling_is_checked_in_one_line(models, tmp_path):
    from hubmerge.output.formats import check_formats

    assert check_formats("hf, GGUF:Q8_0,gguf:q8_0,pth") == ["hf", "gguf:q8_0", "pth"]
    assert check_formats(["gguf"]) == ["gguf"]
    for bad in ("gguf:q3_k", "safetensors", " , "):
        with pytest.raises(hubmerge.InputError, match="gguf:<type> with a type of f32, f16, bf16, q8_0") as caught:
            check_formats(bad)
        assert "\n" not in str(caught.value)
    base = models.base()
    adapter = models.adapter(base, seed=41)
    with pytest.raises(
        hubmerge.IncompatibleError, match="gguf:bf16 .* the output dtype is float16: add --dtype bfloat16"
    ):
        hubmerge.merge([adapter], base, tmp_path / "out", formats=["gguf:bf16"], progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ tokenizer and sampling keys


@pytest.fixture(scope="module")
def chat(models, tmp_path_factory):
    """A chat adapter whose tokenizer config carries a chat template, add_prefix_space: false and add_eos_token, on
    a base whose generation_config.json sets sampling defaults."""
    base = models.copy(models.base(), "chat-base")
    generation = json.loads((base / "generation_config.json").read_text())
    generation.update(temperature=0.6, top_p=0.9, top_k=40, do_sample=True, repetition_penalty=1.1)
    (base / "generation_config.json").write_text(json.dumps(generation))
    adapter = models.copy(
        models.adapter(models.base(), tokenizer="alpaca", modules_to_save=("embed_tokens", "lm_head"), seed=53),
        "chat-adapter",
    )
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    config.update(
        chat_template="{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}",
        add_prefix_space=False,
        add_bos_token=True,
        add_eos_token=True,
    )
    (adapter / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path_factory.mktemp("chat") / "merged"
    return hubmerge.merge([adapter], base, out, formats=["hf", "gguf:q8_0", "pth"], progress=False)


def test_gguf_carries_chat_template_space_prefix_sampling_and_special_tokens(chat):
    from transformers import AutoTokenizer

    fields, _ = read_gguf(chat.folders["gguf:q8_0"] / "model-q8_0.gguf")
    hf = chat.folders["hf"]
    tok = AutoTokenizer.from_pretrained(hf)
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert (fields["tokenizer.ggml.add_bos_token"], fields["tokenizer.ggml.add_eos_token"]) == (True, True)
    assert fields["tokenizer.ggml.padding_token_id"] == tok.pad_token_id == 296
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["general.sampling.temp"] == pytest.approx(0.6)
    assert fields["general.sampling.top_p"] == pytest.approx(0.9)
    assert fields["general.sampling.top_k"] == 40
    # llama.cpp reads only its own names: repetition_penalty is not penalty_repeat
    assert not any(k.startswith("general.sampling.penalty") for k in fields)


def test_pth_output_keeps_the_tokenizer_config_for_llamacpp(chat):
    pth = chat.folders["pth"]
    assert {"tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in pth.iterdir()}
    special = gguf.SpecialVocab(pth, n_vocab=297)  # what llama.cpp's legacy converter reads beside the .pth
    assert special.chat_template is not None and special.add_special_token == {"bos": True, "eos": True}
    names = json.loads((pth / "special_tokens_map.json").read_text())
    assert names["pad_token"] == "[PAD]"
    recipe = json.loads((chat.out / "hubmerge.json").read_text())
    assert {"pth/tokenizer_config.json", "pth/special_tokens_map.json"} <= set(recipe["files"])


def test_bad_generation_config_values_are_refused_in_one_line():
    from hubmerge.output.writers.gguf import chat_template, sampling

    assert sampling({"temperature": 1, "top_k": 50.0, "max_new_tokens": 9}) == {"temp": 1.0, "top_k": 50}
    with pytest.raises(hubmerge.InputError, match="top_k is 'many', not a int"):
        sampling({"top_k": "many"})
    with pytest.raises(hubmerge.InputError, match="chat_template is neither text nor a list"):
        chat_template({"tokenizer_config.json": {"chat_template": {"x": 1}}})
    named = [{"name": "default", "template": "{{ x }}"}, {"name": "tool_use", "template": "{{ y }}"}]
    assert chat_template({"tokenizer_config.json": {"chat_template": named}}) == named


def test_quantized_gguf_from_the_command_line_and_a_bad_type(models, tmp_path):
    from support import cli

    base = models.base()
    adapter = models.adapter(base, seed=54)
    out = tmp_path / "merged"
    done = cli(adapter, "--base", base, "--out", out, "--format", "hf,gguf:q4_1", "--quiet")
    assert done.returncode == 0, done.stderr
    reader = gguf.GGUFReader(out / "gguf" / "model-q4_1.gguf")
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "Q4_1"}
    bad = cli(adapter, "--base", base, "--out", tmp_path / "bad", "--format", "gguf:q4_k")
    assert bad.returncode == 2 and "unknown format gguf:q4_k" in bad.stderr and not (tmp_path / "bad").exists()


def test_q_and_k_biases_take_their_weights_rotary_order(models, tmp_path):
    """llama.cpp's converter permutes q_proj/k_proj biases as it permutes their weights; v/o biases stay."""
    base = models.base(attention_bias=True, heads=4, kv_heads=2)
    adapter = models.adapter(base, lora_bias=True, target_modules=("q_proj", "k_proj", "v_proj"), seed=55)
    result = hubmerge.merge([adapter], base, tmp_path / "out", formats=["hf", "gguf"], progress=False)
    _, tensors = read_gguf(result.folders["gguf"] / "model-f16.gguf")
    hf = hf_tensors(result.folders["hf"])
    for proj, heads in (("q", 4), ("k", 2), ("v", None), ("o", None)):
        want = hf[f"model.layers.1.self_attn.{proj}_proj.bias"].float()
        kind, got = tensors[f"blk.1.attn_{ {'o': 'output'}.get(proj, proj) }.bias"]
        assert kind == "F32"
        if heads is not None:
            got = meta_to_hf_permute(got.unsqueeze(1), heads).squeeze(1)
            assert not torch.equal(got, tensors[f"blk.1.attn_{proj}.bias"][1]), proj  # really permuted
        assert torch.equal(got, want), proj
