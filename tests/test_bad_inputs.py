"""Bad input catalogue: every case runs the real CLI entry point and must exit non-zero with exactly one line
``error: ...`` that names the culprit and the fix, no traceback, and leave no output (nor a staging folder) behind.

To add a case: write a builder that returns the CLI arguments (it may damage private copies of tiny models, or
misconfigure the local Hub through ``ctx.hub``), and add a row to CASES with the fragments the message must contain.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import ALPACA_REPO, no_partial_left

from hubmerge.cli import main

ALL = ("embed_tokens", "lm_head")


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def reversed_plus(m, out):
    base = m.base()
    llama, alpaca = m.plus_recipe(base)
    return [str(alpaca), str(llama), "--base", str(base)]


def llama_tokenizer_with_alpaca_adapter(m, out):
    base = m.base()
    llama, alpaca = m.plus_recipe(base)
    broken = m.copy(alpaca, "alpaca-with-llama-tokenizer")
    (broken / "tokenizer.model").write_bytes((llama / "tokenizer.model").read_bytes())
    return [str(broken), "--base", str(base)]


def config_r_from_other_adapter(m, out):
    base = m.base()
    broken = m.copy(m.plus_recipe(base)[0], "r-mismatch")
    _edit_json(broken / "adapter_config.json", r=64, lora_alpha=128)
    return [str(broken), "--base", str(base)]


def adapter_for_wider_model(m, out):
    wide = m.base(hidden=96, heads=4)
    return [str(m.adapter(wide, seed=21)), "--base", str(m.base())]


def adapter_for_deeper_model(m, out):
    deep = m.base(layers=3)
    return [str(m.adapter(deep, seed=22)), "--base", str(m.base())]


def vocab_extended_without_tokenizer(m, out):
    base = m.base()
    broken = m.copy(m.plus_recipe(base)[0], "no-tokenizer")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (broken / name).unlink()
    return [str(broken), "--base", str(base)]


def embed_without_head(m, out):
    # current PEFT always saves the resized lm_head too: damage a 2023-layout adapter to replace only embed_tokens
    base = m.base()
    broken = m.copy(m.plus_recipe(base)[0], "embed-only")
    state = torch.load(broken / "adapter_model.bin", weights_only=True)
    del state["base_model.model.lm_head.weight"]
    torch.save(state, broken / "adapter_model.bin")
    _edit_json(broken / "adapter_config.json", modules_to_save=["embed_tokens"])
    return [str(broken), "--base", str(base)]


def nan_in_adapter(m, out):
    base = m.base()
    broken = m.copy(m.adapter(base, seed=24), "nan")
    path = broken / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return [str(broken), "--base", str(base)]


def overflow_in_float16(m, out):
    base = m.base()
    broken = m.copy(m.adapter(base, seed=25), "overflow")
    _edit_json(broken / "adapter_config.json", lora_alpha=1e12)
    return [str(broken), "--base", str(base)]


def base_without_config(m, out):
    base = m.copy(m.base(), "no-config")
    (base / "config.json").unlink()
    return [str(m.adapter(m.base(), seed=26)), "--base", str(base)]


def base_not_llama(m, out):
    base = m.copy(m.base(), "gpt2")
    _edit_json(base / "config.json", model_type="gpt2")
    return [str(m.adapter(m.base(), seed=26)), "--base", str(base)]


def base_without_weights(m, out):
    base = m.copy(m.base(), "no-weights")
    (base / "model.safetensors").unlink()
    return [str(m.adapter(m.base(), seed=26)), "--base", str(base)]


def base_index_missing_shard(m, out):
    base = m.copy(m.base(shards=2), "missing-shard")
    next(base.glob("model-00002-*.safetensors")).unlink()
    return [str(m.adapter(m.base(), seed=26)), "--base", str(base)]


def base_truncated(m, out):
    base = m.copy(m.base(), "truncated")
    path = base / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    return [str(m.adapter(m.base(), seed=26)), "--base", str(base)]


def empty_adapter_file(m, out):
    broken = m.copy(m.adapter(m.base(), layout="2023", seed=27), "empty-file")
    (broken / "adapter_model.bin").write_bytes(b"")
    return [str(broken), "--base", str(m.base())]


def empty_state_dict(m, out):
    broken = m.copy(m.adapter(m.base(), layout="2023", seed=27), "empty-dict")
    torch.save({}, broken / "adapter_model.bin")
    assert (broken / "adapter_model.bin").stat().st_size < 2000
    return [str(broken), "--base", str(m.base())]


def unknown_target_modules(m, out):
    broken = m.copy(m.adapter(m.base(), seed=28), "gpt2-targets")
    _edit_json(broken / "adapter_config.json", target_modules=["c_attn", "c_proj"])
    return [str(broken), "--base", str(m.base())]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/hubmerge-pwned",))


def pickle_with_code(m, out):
    broken = m.copy(m.adapter(m.base(), layout="2023", seed=29), "exploit")
    state = torch.load(broken / "adapter_model.bin", weights_only=True)
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = _Exploit()
    torch.save(state, broken / "adapter_model.bin")
    return [str(broken), "--base", str(m.base())]


def output_exists(m, out):
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    return [str(m.adapter(m.base(), seed=26)), "--base", str(m.base())]


def output_inside_base(m, out):
    base = m.copy(m.base(), "base-for-out")
    return [str(m.adapter(m.base(), seed=26)), "--base", str(base), "--out", str(base / "merged")]


def output_inside_the_hf_cache(m, out):
    cache = out.parent / "hf-cache"
    cache.mkdir()
    return [
        str(m.adapter(m.base(), seed=26)),
        "--base",
        str(m.base()),
        "--cache-dir",
        str(cache),
        "--out",
        str(cache / "merged"),
    ]


def bad_dtype(m, out):
    return [str(m.adapter(m.base(), seed=26)), "--base", str(m.base()), "--dtype", "int4"]


def pth_shards_do_not_divide(m, out):
    base = m.base(heads=4, kv_heads=2)
    return [str(m.adapter(base, seed=30)), "--base", str(base), "--format", "pth", "--pth-shards", "4"]


def corrupt_safetensors_header(m, out):
    base = m.copy(m.base(), "bad-header")
    path = base / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"{not json at all, just garbage!!"
    path.write_bytes(bytes(data))
    return [str(m.adapter(m.base(), seed=26)), "--base", str(base)]


def truncated_zip_pickle(m, out):
    broken = m.copy(m.adapter(m.base(), layout="2023", seed=27), "truncated-zip")
    path = broken / "adapter_model.bin"
    os.truncate(path, path.stat().st_size // 2)
    return [str(broken), "--base", str(m.base())]


def hub_hostile_file_name(m, out):
    m.hub.faults.hostile_name(ALPACA_REPO, "../../evil.txt")
    return [ALPACA_REPO, "--base", str(m.base())]


def hub_answers_5xx_repeatedly(m, out):
    m.hub.faults.fail_status(f"/api/models/{ALPACA_REPO}", 503, times=None)
    return [ALPACA_REPO, "--base", str(m.base())]


def hub_drops_the_connection_repeatedly(m, out):
    m.hub.faults.drop_after(ALPACA_REPO, "adapter_model.safetensors", 1000, times=None)
    return [ALPACA_REPO, "--base", str(m.base())]


# (builder, fragments the one-line message must contain)
CASES: list[tuple[Callable, tuple[str, ...]]] = [
    (reversed_plus, ("296-token vocabulary", "297", "reverse the order")),
    (llama_tokenizer_with_alpaca_adapter, ("tokenizer.model", "296 tokens", "297 rows", "LLaMA-type")),
    (config_r_from_other_adapter, ("adapter_config.json", "r=64", "8 rows", "another adapter")),
    (adapter_for_wider_model, ("has lora_A [8, ", "different model size")),
    (adapter_for_deeper_model, ("model.layers.2", "3 layers", "the base has 2", "deeper model")),
    (vocab_extended_without_tokenizer, ("296 tokens", "none ships a tokenizer")),
    (embed_without_head, ("lm_head", "without the other")),
    (nan_in_adapter, ("adapter_model.safetensors", "NaN or Inf", "q_proj")),
    (overflow_in_float16, ("NaN/Inf in float16", "--dtype")),
    (base_without_config, ("no-config", "no config.json")),
    (base_not_llama, ("config.json", "'gpt2' is not supported", "LLaMA")),
    (base_without_weights, ("no-weights", "no model.safetensors")),
    (base_index_missing_shard, ("model.safetensors.index.json", "model-00002-of-00002.safetensors", "download")),
    (base_truncated, ("model.safetensors", "truncated")),
    (empty_adapter_file, ("adapter_model.bin", "empty")),
    (empty_state_dict, ("adapter_model.bin", "no LoRA tensors")),
    (unknown_target_modules, ("adapter_config.json", "c_attn", "another architecture")),
    (pickle_with_code, ("adapter_model.bin", "posix.system", "refuses")),
    (output_exists, ("already exists", "--overwrite")),
    (output_inside_base, ("base-for-out, an input", "never modifies")),
    (output_inside_the_hf_cache, ("hf-cache, an input or the download cache",)),
    (bad_dtype, ("int4", "float16")),
    (pth_shards_do_not_divide, ("cannot split 2 kv heads into 4", "--pth-shards")),
    (corrupt_safetensors_header, ("model.safetensors", "not valid JSON")),
    (truncated_zip_pickle, ("adapter_model.bin", "truncated or damaged")),
    (hub_hostile_file_name, ("'../../evil.txt'", "outside the download folder")),
    (hub_answers_5xx_repeatedly, (ALPACA_REPO, "answered 503", "retry later")),
    (hub_drops_the_connection_repeatedly, (ALPACA_REPO, "connection", "retry")),
]


class Context:
    """What a builder gets: the tiny-model cache, plus ``hub``: the session's local Hub, which the CLI in this
    process is pointed at (endpoint, token, a fresh cache) the first time a builder asks for it."""

    def __init__(self, models, request, monkeypatch, tmp_path):
        self._models, self._request, self._monkeypatch, self._tmp = models, request, monkeypatch, tmp_path
        self.extra_args: list[str] = []

    def __getattr__(self, name):
        return getattr(self._models, name)

    @property
    def hub(self):
        from huggingface_hub import constants

        server = self._request.getfixturevalue("hub")
        self._monkeypatch.setattr(constants, "ENDPOINT", server.url)
        self._monkeypatch.setenv("HF_TOKEN", server.tokens["alice"])
        self.extra_args = ["--cache-dir", str(self._tmp.parent / f"{self._tmp.name}-cache")]
        return server


@pytest.mark.parametrize("build,fragments", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_gives_one_line_and_no_output(models, request, monkeypatch, tmp_path, capsys, build, fragments):
    out = tmp_path / "merged"
    ctx = Context(models, request, monkeypatch, tmp_path)
    args = build(ctx, out) + ctx.extra_args
    if "--out" not in args:
        args += ["--out", str(out)]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()  # building the inputs may print
    code = main(args + ["--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    out_arg = Path(args[args.index("--out") + 1])
    if build is output_exists:
        assert (out / "keep.txt").read_text() == "user data"
    else:
        assert no_partial_left(out_arg)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not Path("/tmp/hubmerge-pwned").exists()
