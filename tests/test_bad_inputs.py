"""Bad input catalogue: every case runs the real CLI entry point and must exit non-zero with exactly one line
``error: ...`` that names the culprit and the fix, no traceback, and leave no output (nor a staging folder) behind.

To add a case: write a builder that returns the CLI arguments (it may damage private copies of tiny models, or
misconfigure the local Hub through ``ctx.hub``), and add a row to CASES with the fragments the message must contain.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import ALPACA_REPO, no_partial_left, one_line_error

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


# ------------------------------------------------------------------------------------ hostile files, bounded cost
# Tiny hand-built files that once cost minutes or gigabytes. Each runs the CLI in a subprocess under an address-space
# limit and a timeout, and its peak resident memory (VmHWM, which exec resets) must stay that of a plain failing run.

PICKLE_MEMO_BOMB = b"\x80\x02}r\xff\xff\xff\x7f."  # 9 bytes: EMPTY_DICT, LONG_BINPUT 2**31-1
PEAK_RSS = 1 << 30
SECONDS = 90  # two cores shared by the whole team; a case alone takes ~5 s, mostly importing torch


def _bin_adapter(m, name: str) -> Path:
    return m.copy(m.adapter(m.base(), layout="2023", seed=27), name)


def _write_torch_zip(path: Path, pickle_bytes: bytes, *, deflate: bool = False) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
        zf.writestr("archive/byteorder", "little")


def _safetensors_header(path: Path, edit: Callable[[dict], bytes]) -> None:
    """Rewrite a safetensors file's header as ``edit(header)`` returns it (raw JSON bytes), keeping the data."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    raw = edit(json.loads(data[8 : 8 + n]))
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _nbytes(entry: dict) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


def _two(header: dict) -> tuple[str, str]:
    """The first two tensors of a safetensors header that hold data."""
    names = [k for k in header if k != "__metadata__" and _nbytes(header[k])]
    return names[0], names[1]


def adapter_pickle_with_a_huge_memo_index(m, out):
    broken = _bin_adapter(m, "memo-bomb")
    _write_torch_zip(broken / "adapter_model.bin", PICKLE_MEMO_BOMB)
    return [str(broken), "--base", str(m.base())]


def adapter_pickle_with_exponential_sharing(m, out):
    broken = _bin_adapter(m, "shared-tuple")
    ops = b"X\x01\x00\x00\x00aq\x000"  # 'a' as memo 0, then memo[i + 1] = (memo[i], memo[i]): 2**60 leaves
    for i in range(60):
        ops += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
    _write_torch_zip(broken / "adapter_model.bin", b"\x80\x02}" + ops + b"h\x3cK\x00s.")
    return [str(broken), "--base", str(m.base())]


def adapter_pickle_with_build(m, out):
    broken = _bin_adapter(m, "build")
    _write_torch_zip(
        broken / "adapter_model.bin",
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x08\x00\x00\x00__name__X\x01\x00\x00\x00xsb.",
    )
    return [str(broken), "--base", str(m.base())]


def adapter_pickle_deflate_bomb(m, out):
    broken = _bin_adapter(m, "deflate-bomb")
    _write_torch_zip(broken / "adapter_model.bin", b"\x80\x02(" + b"]" * (64 << 20) + b"l.", deflate=True)
    assert (broken / "adapter_model.bin").stat().st_size < 200_000
    return [str(broken), "--base", str(m.base())]


def adapter_zip_with_a_duplicated_record(m, out):
    broken = _bin_adapter(m, "dup-record")
    path = broken / "adapter_model.bin"
    with zipfile.ZipFile(path) as zf:
        record = next(i for i in zf.infolist() if "/data/" in i.filename)
        size = record.file_size
    with zipfile.ZipFile(path, "a") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": the point of the case
        zf.writestr(record.filename, b"\x3c" * size)  # float16 1.0 everywhere, where torch.load reads the first
    return [str(broken), "--base", str(m.base())]


def adapter_tensor_view_with_stride_zero(m, out):
    broken = _bin_adapter(m, "stride-0")
    path = broken / "adapter_model.bin"
    state = torch.load(path, weights_only=True)
    key = next(k for k in state if k.endswith("q_proj.lora_B.weight"))
    state[key] = state[key][:1, :1].clone().expand(state[key].shape)  # 2 bytes of storage, a full matrix of view
    torch.save(state, path)
    return [str(broken), "--base", str(m.base())]


def adapter_safetensors_with_a_duplicate_key(m, out):
    broken = m.copy(m.adapter(m.base(), seed=26), "st-dup")
    name = next(iter(load_file(broken / "adapter_model.safetensors")))

    def edit(h):
        text = json.dumps(h)
        entry = json.dumps({name: h[name]})[1:-1]
        return (text[:-1] + ", " + entry + "}").encode()  # the same name again, same offsets

    _safetensors_header(broken / "adapter_model.safetensors", edit)
    return [str(broken), "--base", str(m.base())]


def adapter_safetensors_with_overlapping_tensors(m, out):
    broken = m.copy(m.adapter(m.base(), seed=26), "st-overlap")

    def edit(h):
        a, b = _two(h)
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + _nbytes(h[b])]
        return json.dumps(h).encode()

    _safetensors_header(broken / "adapter_model.safetensors", edit)
    return [str(broken), "--base", str(m.base())]


def adapter_safetensors_with_a_float_shape(m, out):
    broken = m.copy(m.adapter(m.base(), seed=26), "st-float-shape")

    def edit(h):
        name = _two(h)[0]
        h[name]["shape"] = [float(d) for d in h[name]["shape"]]
        return json.dumps(h).encode()

    _safetensors_header(broken / "adapter_model.safetensors", edit)
    return [str(broken), "--base", str(m.base())]


def base_safetensors_header_with_infinity(m, out):
    base = m.copy(m.base(), "st-infinity")
    _safetensors_header(
        base / "model.safetensors", lambda h: json.dumps({**h, "__metadata__": {"x": 1e999}}).encode()
    )  # json.dumps writes Infinity
    return [str(m.adapter(m.base(), seed=26)), "--base", str(base)]


def adapter_config_catastrophic_regex(m, out):
    broken = m.copy(m.adapter(m.base(), seed=26), "regex-bomb")
    _edit_json(broken / "adapter_config.json", target_modules="(a+)+$")
    return [str(broken), "--base", str(m.base())]


def adapter_config_invalid_regex(m, out):
    broken = m.copy(m.adapter(m.base(), seed=26), "regex-invalid")
    _edit_json(broken / "adapter_config.json", target_modules=".*(q_proj")
    return [str(broken), "--base", str(m.base())]


def adapter_config_nested_too_deeply(m, out):
    broken = m.copy(m.adapter(m.base(), seed=26), "deep-json")
    (broken / "adapter_config.json").write_text('{"r": 8, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return [str(broken), "--base", str(m.base())]


def adapter_config_nan(m, out):
    broken = m.copy(m.adapter(m.base(), seed=26), "nan-config")
    _edit_json(broken / "adapter_config.json", lora_alpha=float("nan"))  # json.dumps writes NaN
    return [str(broken), "--base", str(m.base())]


def adapter_config_target_modules_of_numbers(m, out):
    broken = m.copy(m.adapter(m.base(), seed=26), "numeric-targets")
    _edit_json(broken / "adapter_config.json", target_modules=["q_proj", 7])
    return [str(broken), "--base", str(m.base())]


def base_tokenizer_json_of_65_mb(m, out):
    base = m.copy(m.base(), "huge-tokenizer-json")
    (base / "tokenizer.model").unlink()
    with open(base / "tokenizer.json", "wb") as f:
        f.truncate(65 << 20)  # sparse: nothing of it is on disk
    return [str(m.adapter(m.base(), seed=26)), "--base", str(base)]


def base_tokenizer_json_vocab_of_wrong_type(m, out):
    base = m.copy(m.base(), "tokenizer-json-type")
    (base / "tokenizer.model").unlink()
    (base / "tokenizer.json").write_text(json.dumps({"model": {"vocab": "not a map"}}))
    return [str(m.adapter(m.base(), seed=26)), "--base", str(base)]


def adapter_added_tokens_with_a_bad_id(m, out):
    base = m.base()
    broken = m.copy(m.plus_recipe(base)[1], "added-tokens-id")
    (broken / "added_tokens.json").write_text(json.dumps({"[PAD]": "x"}))
    return [str(broken), "--base", str(base)]


def base_config_with_a_billion_layers(m, out):
    base = m.copy(m.base(), "billion-layers")
    _edit_json(base / "config.json", num_hidden_layers=10**9)
    return [str(m.adapter(m.base(), seed=26)), "--base", str(base)]


def base_config_contradicting_untouched_tensors(m, out):
    base = m.copy(m.base(), "wrong-intermediate")
    _edit_json(base / "config.json", intermediate_size=4 * 64)  # the weights have 3 * hidden
    return [str(m.adapter(m.base(), seed=26)), "--base", str(base)]


def base_index_weight_map_not_a_map(m, out):
    base = m.copy(m.base(shards=2), "index-list")
    _edit_json(base / "model.safetensors.index.json", weight_map=["model-00001-of-00002.safetensors"])
    return [str(m.adapter(m.base(), seed=26)), "--base", str(base)]


def _meta_base(m, name: str) -> Path:
    meta = m.root / "copies" / name
    shutil.rmtree(meta, ignore_errors=True)
    assert main(["convert", str(m.base()), "--out", str(meta), "--format", "pth", "--quiet"]) == 0
    return meta


def meta_checklist_naming_a_file_outside(m, out):
    meta = _meta_base(m, "checklist-outside")
    (meta / "checklist.chk").write_text(f"{'0' * 32}  /proc/self/environ\n")
    return [str(m.adapter(m.base(), seed=26)), "--base", str(meta)]


def meta_checklist_climbing_out(m, out):
    meta = _meta_base(m, "checklist-dotdot")
    (meta / "checklist.chk").write_text(f"{'0' * 32}  ../secret.txt\n")
    return [str(m.adapter(m.base(), seed=26)), "--base", str(meta)]


def meta_params_with_a_billion_layers(m, out):
    meta = _meta_base(m, "params-layers")
    _edit_json(meta / "params.json", n_layers=10**9)
    return [str(m.adapter(m.base(), seed=26)), "--base", str(meta)]


def verify_recipe_naming_a_file_outside(m, out):
    merged = m.root / "copies" / "recipe-outside"
    shutil.rmtree(merged, ignore_errors=True)
    assert main([str(m.adapter(m.base(), seed=26)), "--base", str(m.base()), "--out", str(merged), "-q"]) == 0
    recipe = json.loads((merged / "hubmerge.json").read_text())
    recipe["files"]["/etc/hostname"] = "0" * 64
    (merged / "hubmerge.json").write_text(json.dumps(recipe))
    return ["verify", str(merged)]


# (builder, fragments the one-line message must contain)
HOSTILE_FILES: list[tuple[Callable, tuple[str, ...]]] = [
    (adapter_pickle_with_a_huge_memo_index, ("adapter_model.bin", "memo index")),
    (adapter_pickle_with_exponential_sharing, ("adapter_model.bin", "dict key")),
    (adapter_pickle_with_build, ("adapter_model.bin", "BUILD", "refuses")),
    (adapter_pickle_deflate_bomb, ("adapter_model.bin", "data.pkl is implausibly large")),
    (adapter_zip_with_a_duplicated_record, ("adapter_model.bin", "twice", "torch.load")),
    (adapter_tensor_view_with_stride_zero, ("adapter_model.bin", "holds more elements")),
    (adapter_safetensors_with_a_duplicate_key, ("adapter_model.safetensors", "appears twice")),
    (adapter_safetensors_with_overlapping_tensors, ("adapter_model.safetensors", "overlaps another")),
    (adapter_safetensors_with_a_float_shape, ("adapter_model.safetensors", "malformed")),
    (base_safetensors_header_with_infinity, ("model.safetensors", "Infinity is not JSON")),
    (adapter_config_catastrophic_regex, ("adapter_config.json", "(a+)+$", "nests a repetition", "list of module")),
    (adapter_config_invalid_regex, ("adapter_config.json", "not a valid regular expression")),
    (adapter_config_nested_too_deeply, ("adapter_config.json", "nested too deeply")),
    (adapter_config_nan, ("adapter_config.json", "NaN is not JSON")),
    (adapter_config_target_modules_of_numbers, ("adapter_config.json", "target_modules", "module names")),
    (base_tokenizer_json_of_65_mb, ("tokenizer.json", "larger than 64 MiB")),
    (base_tokenizer_json_vocab_of_wrong_type, ("tokenizer.json", "'vocab' must be")),
    (adapter_added_tokens_with_a_bad_id, ("added_tokens.json", "token id 'x'")),
    (base_config_with_a_billion_layers, ("config.json", "num_hidden_layers 1000000000")),
    (base_config_contradicting_untouched_tensors, ("gate_proj", "config.json implies [256, 64]")),
    (base_index_weight_map_not_a_map, ("model.safetensors.index.json", "'weight_map' must be an object")),
    (meta_checklist_naming_a_file_outside, ("checklist.chk", "/proc/self/environ", "plain file name")),
    (meta_checklist_climbing_out, ("checklist.chk", "../secret.txt", "plain file name")),
    (meta_params_with_a_billion_layers, ("params.json", "n_layers")),
    (verify_recipe_naming_a_file_outside, ("/etc/hostname", "outside the folder")),
]

_RUNNER = (
    "import resource, sys\n"
    f"resource.setrlimit(resource.RLIMIT_AS, ({4 << 30}, {4 << 30}))\n"
    "from hubmerge.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
    "print(f'peak-rss-kb {hwm}')\n"
    "sys.exit(code)\n"
)


@pytest.mark.parametrize("build,fragments", HOSTILE_FILES, ids=[c[0].__name__ for c in HOSTILE_FILES])
def test_hostile_file_gives_one_line_cheaply(models, tmp_path, build, fragments):
    out = tmp_path / "merged"
    args = build(Context(models, None, None, tmp_path), out)
    if args[0] != "verify":
        args += ["--out", str(out), "--quiet"]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, *args], capture_output=True, text=True, timeout=SECONDS, env=os.environ
    )
    seconds = time.monotonic() - started
    line = one_line_error(done)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    peak = int(done.stdout.split("peak-rss-kb ")[1].split()[0]) * 1024
    assert peak < PEAK_RSS, f"peak RSS {peak / 2**20:.0f} MiB"
    assert seconds < SECONDS
    if args[0] != "verify":
        assert no_partial_left(out)
    print(f"{build.__name__}: {seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB")


# ------------------------------------------------------------------------------------------ warnings, not errors


def _run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_shallower_adapter_and_an_adapter_given_twice_are_warned_about_in_plan_and_summary(models, tmp_path, capsys):
    base = models.base()
    shallow = models.adapter(models.base(layers=1), seed=31)  # same sizes, one layer: a smaller model's adapter
    twice = models.adapter(base, seed=26)
    for adapters, warning in (
        ([shallow], "adapts only the first 1 of the base's 2 layers"),
        ([twice, twice], "the same adapter weights as"),
    ):
        code, plan = _run_cli(capsys, *adapters, "--base", base, "--dry-run")
        assert code == 0 and warning in plan, plan
        out = tmp_path / f"out{len(adapters)}"
        code, summary = _run_cli(capsys, *adapters, "--base", base, "--out", out)
        assert code == 0 and "warning: " in summary and warning in summary, summary


PEFT_NAMES = [
    f"model.layers.{i}.{m}" for i in (0, 1, 12) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")
]


@pytest.mark.parametrize(
    "pattern",
    [
        r".*\.(q_proj|v_proj)",
        r"^(?!.*mlp).*proj$",
        r".*layers\.1\..*",
        r"model\.layers\.\d+\.self_attn\.q_proj",
        "q_proj",
    ],
)
def test_target_module_regexes_select_what_peft_selects(tmp_path, pattern):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from hubmerge.model.adapters import ModuleRules

    rules = ModuleRules({"target_modules": pattern}, tmp_path / "adapter_config.json")
    peft_config = LoraConfig(target_modules=pattern)
    for name in PEFT_NAMES:
        assert rules.targeted(name) == bool(check_target_module_exists(peft_config, name)), name


@pytest.mark.parametrize(
    "pattern,problem",
    [
        ("(a+)+$", "nests a repetition"),
        ("(a|aa)*b", "repeats an alternation"),
        (r"(\w+)\1", "backreference"),
        (".*a.*b.*c.*d", "open-ended repetitions"),
        ("x" * 2000, "at most 1000"),
        ("(" * 300 + ")" * 300, "more than 50 groups"),  # deep enough to take re's own parser to its limit
        ("[", "not a valid regular expression"),
    ],
)
def test_target_module_regexes_that_could_backtrack_are_refused_at_once(tmp_path, pattern, problem):
    from hubmerge.errors import InputError
    from hubmerge.model.adapters import ModuleRules

    started = time.monotonic()
    with pytest.raises(InputError, match="adapter_config.json") as caught:
        ModuleRules({"target_modules": pattern}, tmp_path / "adapter_config.json")
    assert problem in str(caught.value) and time.monotonic() - started < 1
