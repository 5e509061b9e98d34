"""``--format gguf`` read back with the gguf package's own reader (and with llama.cpp itself when llama-cpp-python is
installed): every tensor in llama.cpp's layout, the hyperparameters and the full extended vocabulary, against the HF
output of the same merge."""

from __future__ import annotations

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
    """(fields as Python values, {name: (type name, tensor)}) with tensors as torch in their stored dtype."""
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        data = torch.from_numpy(np.array(t.data))
        if kind == "BF16":
            data = data.view(torch.bfloat16)
        tensors[t.name] = (kind, data.reshape(tuple(int(d) for d in reversed(t.shape))))
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
