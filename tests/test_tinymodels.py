"""The tiny real-format fixtures are what every other test trusts: check they are what they claim."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hubmerge.testing import tinymodels as tm

IDS = torch.tensor([[1, 5, 9, 100, 200, 17, 250, 3], [1, 40, 41, 42, 43, 44, 45, 46]])
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_2023_KEYS = {
    "base_model_name_or_path",
    "bias",
    "enable_lora",
    "fan_in_fan_out",
    "inference_mode",
    "lora_alpha",
    "lora_dropout",
    "merge_weights",
    "modules_to_save",
    "peft_type",
    "r",
    "target_modules",
    "task_type",
}
EMBEDS = ("embed_tokens", "lm_head")
# transformers 5 deprecation raised from inside PEFT, not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _safetensors_keys(path):
    with safe_open(path, "pt") as f:
        return set(f.keys())


def _lora_keys(layers, modules):
    return {
        f"base_model.model.model.layers.{i}.{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}.lora_{ab}.weight"
        for i in range(layers)
        for m in modules
        for ab in "AB"
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tm.make_base(tmp_path_factory.mktemp("base"), kv_heads=2)


@pytest.fixture(scope="module")
def plus(tmp_path_factory, base):
    """The Plus recipe in the 2023 layout: llama-type (r=8) then alpaca-type (r=64, alpha=128)."""
    root = tmp_path_factory.mktemp("plus")
    llama = tm.make_adapter(root / "llama", base, layout="2023", modules_to_save=EMBEDS, tokenizer="llama")
    alpaca = tm.make_adapter(
        root / "alpaca", base, layout="2023", r=64, alpha=128, modules_to_save=EMBEDS, tokenizer="alpaca", seed=2
    )
    return llama, alpaca


def test_tokenizer_sizes_and_determinism(tmp_path):
    sizes = {
        kind: tm.sp_size(tm.make_tokenizer(tmp_path / kind, kind) / "tokenizer.model")
        for kind in ("base", "llama", "alpaca")
    }
    assert sizes == {"base": 256, "llama": 296, "alpaca": 297}
    assert tm.sp_size(tm.make_tokenizer(tmp_path / "big", "llama", base_vocab=400, extra=7) / "tokenizer.model") == 407
    tm._trained_base.cache_clear()  # train again from scratch, not from the in-process cache
    again = tm.make_tokenizer(tmp_path / "again", "llama")
    assert _sha(again / "tokenizer.model") == _sha(tmp_path / "llama" / "tokenizer.model")
    assert _sha(tmp_path / "base" / "tokenizer.model") != _sha(again / "tokenizer.model")
    config = json.loads((tmp_path / "alpaca" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["bos_token"] == "<s>"
    assert json.loads((tmp_path / "alpaca" / "special_tokens_map.json").read_text())["pad_token"] == "[PAD]"
    with pytest.raises(ValueError):
        tm.make_tokenizer(tmp_path / "bad", "chinese")


def test_autotokenizer_loads_each_kind(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    for kind, size in (("base", 256), ("llama", 296), ("alpaca", 297)):
        tok = AutoTokenizer.from_pretrained(tm.make_tokenizer(tmp_path / kind, kind))
        assert len(tok) == size, kind
    # llama: the appended CJK pieces are ids 256.. and HF encodes exactly as sentencepiece does
    text = "一丁 bakate 七"  # U+4E00, U+4E01, U+4E03
    tok = AutoTokenizer.from_pretrained(tmp_path / "llama")
    ids = tok.encode(text)
    assert ids == spm.SentencePieceProcessor(model_file=str(tmp_path / "llama" / "tokenizer.model")).encode(text)
    assert ids[1:3] == [256, 257] and ids[-1] == 259 and tok.convert_ids_to_tokens(256) == "一"
    alpaca = AutoTokenizer.from_pretrained(tmp_path / "alpaca")
    assert alpaca.pad_token == "[PAD]" and alpaca.pad_token_id == 296


@pytest.mark.parametrize(
    "weights,shards,dtype,kv_heads,tie",
    [
        ("safetensors", 1, "float16", None, False),
        ("safetensors", 3, "bfloat16", 2, False),
        ("bin", 1, "float32", None, False),
        ("bin", 2, "float16", 1, True),
    ],
)
def test_base_loads_with_transformers(tmp_path, weights, shards, dtype, kv_heads, tie):
    from transformers import AutoModelForCausalLM

    d = tm.make_base(tmp_path, weights=weights, shards=shards, dtype=dtype, kv_heads=kv_heads, tie_word_embeddings=tie)
    stem = "model" if weights == "safetensors" else "pytorch_model"
    if shards == 1:
        files = [d / f"{stem}.{weights}"]
    else:
        index = json.loads((d / f"{stem}.{weights}.index.json").read_text())
        files = sorted({d / f for f in index["weight_map"].values()})
        assert [f.name for f in files] == [f"{stem}-{k:05d}-of-{shards:05d}.{weights}" for k in range(1, shards + 1)]
    stored = {}
    for f in files:
        stored.update(load_file(f) if weights == "safetensors" else torch.load(f, weights_only=True))
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not any(info.values()), info
    assert model.dtype == getattr(torch, dtype) and model.config.vocab_size == 256
    assert ("lm_head.weight" in stored) != tie
    assert stored["model.layers.1.self_attn.k_proj.weight"].shape == (16 * (kv_heads or 4), 64)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in stored.items())
    assert (d / "generation_config.json").exists() and (d / "tokenizer.model").exists()


def test_base_is_deterministic_and_fp16_safe(tmp_path, base):
    again = tm.make_base(tmp_path, kv_heads=2)
    assert _sha(again / "model.safetensors") == _sha(base / "model.safetensors")
    logits = tm.model_logits(base, IDS, dtype=torch.float16)
    assert torch.isfinite(logits).all() and logits.shape == (2, 8, 256)


def test_2023_adapter_has_exactly_the_2023_keys(base, plus):
    llama, _ = plus
    assert {p.name for p in llama.iterdir()} == {"adapter_model.bin", "adapter_config.json", *tm.TOKENIZER_FILES}
    state = torch.load(llama / "adapter_model.bin", weights_only=True)
    expected = _lora_keys(2, SEVEN) | {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
    assert set(state) == expected
    assert {t.dtype for t in state.values()} == {torch.float16}
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert state[f"{q}.lora_A.weight"].shape == (8, 64) and state[f"{q}.lora_B.weight"].shape == (64, 8)
    assert state["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 8)  # GQA
    assert state["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (8, 192)
    assert all(state[k].abs().sum() > 0 for k in expected)  # lora_B is not PEFT's zero init
    embed = state["base_model.model.model.embed_tokens.weight"]
    assert embed.shape == (296, 64) and state["base_model.model.lm_head.weight"].shape == (296, 64)
    assert not torch.equal(embed[:256], load_file(base / "model.safetensors")["model.embed_tokens.weight"])
    config = json.loads((llama / "adapter_config.json").read_text())
    assert set(config) == CONFIG_2023_KEYS
    assert config["enable_lora"] is None and config["merge_weights"] is False and config["r"] == 8
    assert config["modules_to_save"] == list(EMBEDS) and config["target_modules"] == list(SEVEN)
    with pytest.raises(ValueError):
        tm.make_adapter(llama.parent / "rs", base, layout="2023", use_rslora=True)


def test_current_adapter_loads_with_peft_and_scales_as_documented(tmp_path, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d = tm.make_adapter(
        tmp_path,
        base,
        target_modules=["q_proj", "v_proj"],
        use_rslora=True,
        rank_pattern={"model.layers.0.self_attn.q_proj": 4},
        alpha_pattern={"v_proj": 7},
    )
    assert _safetensors_keys(d / "adapter_model.safetensors") == _lora_keys(2, ("q_proj", "v_proj"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), d)
    attn = [layer.self_attn for layer in model.base_model.model.model.layers]
    assert attn[0].q_proj.r["default"] == 4 and attn[0].q_proj.scaling["default"] == pytest.approx(32 / 2)
    assert attn[1].q_proj.scaling["default"] == pytest.approx(32 / 8**0.5)
    assert attn[0].v_proj.scaling["default"] == attn[1].v_proj.scaling["default"] == pytest.approx(7 / 8**0.5)
    assert attn[0].q_proj.lora_B["default"].weight.abs().sum() > 0


def test_current_layout_embedding_keys(tmp_path, base):
    """What current PEFT writes for a resized vocab, with and without modules_to_save."""
    plain = tm.make_adapter(tmp_path / "plain", base, target_modules=["q_proj"], tokenizer="alpaca")
    mts = tm.make_adapter(tmp_path / "mts", base, target_modules=["q_proj"], tokenizer="alpaca", modules_to_save=EMBEDS)
    embeds = {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
    lora = _lora_keys(2, ("q_proj",))
    assert _safetensors_keys(plain / "adapter_model.safetensors") == lora | embeds
    assert json.loads((plain / "adapter_config.json").read_text())["modules_to_save"] is None
    state = load_file(mts / "adapter_model.safetensors")
    extra = {k.replace(".weight", f".{w}.weight") for k in embeds for w in ("modules_to_save", "original_module")}
    assert set(state) == lora | embeds | extra
    e = "base_model.model.model.embed_tokens"
    assert state[f"{e}.weight"].shape == (297, 64)
    assert torch.equal(state[f"{e}.weight"], state[f"{e}.modules_to_save.weight"])
    assert not torch.equal(state[f"{e}.weight"], state[f"{e}.original_module.weight"])


def test_regex_targets_and_fan_in_fan_out(tmp_path, base):
    d = tm.make_adapter(tmp_path / "fifo", base, layout="2023", fan_in_fan_out=True, target_modules=r".*\.(q|v)_proj")
    normal = tm.make_adapter(tmp_path / "normal", base, layout="2023", target_modules=r".*\.(q|v)_proj")
    assert set(torch.load(d / "adapter_model.bin", weights_only=True)) == _lora_keys(2, ("q_proj", "v_proj"))
    assert json.loads((d / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert _sha(d / "adapter_model.bin") == _sha(normal / "adapter_model.bin")
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True"):
        fifo_logits = tm.peft_merged_logits(base, [d], IDS)
    assert torch.equal(fifo_logits, tm.peft_merged_logits(base, [normal], IDS))


def test_oracle_merge_changes_logits_and_layouts_agree(tmp_path, base):
    lora_only = tm.make_adapter(tmp_path / "lora", base)
    merged = tm.peft_merged_logits(base, [lora_only], IDS)
    assert merged.shape == (2, 8, 256)
    assert (merged - tm.model_logits(base, IDS)).abs().max() > 0.5
    # same seed and recipe: the 2023 file and the current file must merge to the same model
    current = tm.make_adapter(tmp_path / "current", base, modules_to_save=EMBEDS, tokenizer="llama")
    old = tm.make_adapter(tmp_path / "old", base, layout="2023", modules_to_save=EMBEDS, tokenizer="llama")
    merged = tm.peft_merged_logits(base, [current], IDS)
    assert merged.shape == (2, 8, 296)
    torch.testing.assert_close(tm.peft_merged_logits(base, [old], IDS), merged)


def test_plus_recipe_in_order(base, plus):
    llama, alpaca = plus
    first = tm.peft_merged_logits(base, [llama], IDS)
    both = tm.peft_merged_logits(base, [llama, alpaca], IDS)
    assert first.shape == (2, 8, 296) and both.shape == (2, 8, 297)
    assert (both[..., :296] - first).abs().max() > 0.5
    with pytest.raises(RuntimeError, match="size mismatch"):  # reversed: the vocab would shrink
        tm.peft_merged_logits(base, [alpaca, llama], IDS)
