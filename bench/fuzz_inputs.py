"""A fuzz-ish sweep of damaged inputs through the real CLI: every input file kind is truncated, bit-flipped, given
values of the wrong type, huge numbers, deep nesting and non-standard JSON; each run must end in exit 0 or one
``error:`` line. Anything else (an exception escaping ``main``, several lines, a timeout) is printed, grouped by
where it came from.

    PYTHONPATH=$PWD python -m bench.fuzz_inputs [--workdir DIR] [--limit N]

It runs the CLI in this process (a subprocess per case would spend most of its time importing torch), under an
address-space limit and a per-case alarm, so a runaway case fails here instead of taking the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import resource
import shutil
import signal
import struct
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch

from hubmerge.cli import main
from hubmerge.testing import tinymodels as tm

CASE_SECONDS = 20
ADDRESS_SPACE = 8 << 30

JSON_VALUES: list[object] = [None, "x", -1, 0, 1.5, 10**30, True, [], {}, [[[[]]]], {"a": {"b": None}}, "(a+)+$"]
JSON_TEXTS = ["", "[]", '"x"', "null", "1e999", "NaN", "[Infinity]", "[" * 100_000, '{"a":' * 50_000, "{\xff}"]


class Timeout(Exception):
    pass


def _alarm(*_):
    raise Timeout(f"over {CASE_SECONDS} s")


def json_mutations(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(label, damaged content) pairs for a JSON file."""
    for t in JSON_TEXTS:
        yield f"text {t[:12]!r}", t.encode("utf-8", "surrogateescape")
    yield "truncated", data[: len(data) // 2]
    doc = json.loads(data)
    if not isinstance(doc, dict):
        return
    paths: list[tuple[str, ...]] = [(k,) for k in doc]
    for k, v in doc.items():  # one level down too: tokenizer.json's model.vocab, added_tokens entries...
        if isinstance(v, dict):
            paths += [(k, k2) for k2 in list(v)[:8]]
    for keys in paths:
        for value in JSON_VALUES:
            d = json.loads(data)
            target = d
            for k in keys[:-1]:
                target = target[k]
            target[keys[-1]] = value
            yield f"{'.'.join(keys)[:40]}={json.dumps(value)[:12]}", json.dumps(d).encode()


def binary_mutations(data: bytes, safetensors: bool, seed: int) -> Iterator[tuple[str, bytes]]:
    """(label, damaged content) pairs for a weight or tokenizer file."""
    for cut in (0, 4, 8, 9, 64, len(data) // 2, len(data) - 1):
        yield f"cut {cut}", data[:cut]
    rng = random.Random(seed)
    for _ in range(12):
        at, bit = rng.randrange(min(len(data), 4096)), 1 << rng.randrange(8)
        b = bytearray(data)
        b[at] ^= bit
        yield f"flip {at}^{bit}", bytes(b)
    if safetensors:
        (hlen,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + hlen])
        name = next(k for k in header if k != "__metadata__")
        for field in ("dtype", "shape", "data_offsets"):
            for value in [*JSON_VALUES, [2.0], ["1"], [0, 10**20], [-1, 4]]:
                h = dict(header)
                h[name] = {**h[name], field: value}
                raw = json.dumps(h).encode()
                yield f"header {field}={json.dumps(value)[:12]}", struct.pack("<Q", len(raw)) + raw + data[8 + hlen :]


def _tokenizer_json_adapter(src: Path, dst: Path) -> None:
    """A copy of ``src`` whose vocabulary is in tokenizer.json + added_tokens.json instead of tokenizer.model."""
    import sentencepiece

    shutil.copytree(src, dst)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(dst / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    doc = {"model": {"type": "BPE", "vocab": vocab}, "added_tokens": [{"id": 0, "content": sp.id_to_piece(0)}]}
    (dst / "tokenizer.json").write_text(json.dumps(doc))
    (dst / "added_tokens.json").write_text(json.dumps({sp.id_to_piece(1): 1}))
    (dst / "tokenizer.model").unlink()


def run(args: list[str]) -> tuple[str, str]:
    """("ok" | "error" | "TRACEBACK" | "MULTILINE", detail)."""
    err = io.StringIO()
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - anything escaping main() is the finding
        if isinstance(exc, SystemExit) and exc.code == 2:  # argparse usage errors
            return "error", err.getvalue().strip().splitlines()[-1]
        frames = traceback.extract_tb(exc.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames) if "hubmerge" in f.filename), "?")
        return "TRACEBACK", f"{type(exc).__name__} at {where}: {str(exc)[:120]}"
    finally:
        signal.alarm(0)
    lines = err.getvalue().strip().splitlines()
    if code == 0 or (code == 1 and not lines and args[0] == "verify"):  # verify reports failures in its table
        return "ok", ""
    if len(lines) == 1 and lines[0].startswith("error: "):
        return "error", lines[0]
    return "MULTILINE", " | ".join(lines)[:300]


def main_sweep() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to build the tiny models (default: a temporary folder)")
    parser.add_argument("--limit", type=int, default=0, help="stop after N cases")
    opts = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    signal.signal(signal.SIGALRM, _alarm)
    root = Path(opts.workdir or tempfile.mkdtemp(prefix="hubmerge-fuzz-"))
    pristine = root / "pristine"
    if not pristine.exists():
        base = tm.make_base(pristine / "base", shards=2)
        tm.make_adapter(
            pristine / "adapter", base, seed=1, tokenizer="alpaca", modules_to_save=("embed_tokens", "lm_head")
        )
        tm.make_adapter(pristine / "adapter2023", base, layout="2023", seed=2)
        assert main([str(pristine / "adapter2023"), "--base", str(base), "--out", str(pristine / "merged"), "-q"]) == 0
        assert main(["convert", str(base), "--out", str(pristine / "meta"), "--format", "pth", "-q"]) == 0
        meta = pristine / "meta"
        sums = [f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(meta.iterdir()) if p.is_file()]
        (meta / "checklist.chk").write_text("".join(sums))
        (meta / "tokenizer_checklist.chk").write_text(sums[-1])  # tokenizer.model sorts last
        (meta / "config.json").unlink(missing_ok=True)
        _tokenizer_json_adapter(pristine / "adapter", pristine / "adapterjson")
    work = root / "work"
    merge = ["--base", "base", "--out", "out", "-q"]
    scenarios = [  # (folder whose files are damaged, which of them, CLI arguments relative to the work copy)
        ("adapter", "*", ["adapter", *merge]),
        ("adapter2023", "*", ["adapter2023", *merge]),
        ("base", "*", ["adapter2023", *merge]),
        ("adapterjson", "*", ["adapterjson", *merge]),
        ("adapter", "*.json", ["adapter", *merge, "--format", "gguf,pth"]),  # the writers read tokenizer configs
        ("meta", "*", ["convert", "meta", "--out", "out", "-q"]),
        ("merged", "*", ["verify", "merged"]),
    ]
    targets = [
        (folder, path.name, args)
        for folder, pattern, args in scenarios
        for path in sorted((pristine / folder).glob(pattern))
        if path.is_file()
    ]
    results: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    per_folder: dict[str, dict[str, int]] = {}
    n = 0
    worst = (0.0, "")
    for folder, name, relative_args in targets:
        data = (pristine / folder / name).read_bytes()
        if name.endswith(".json"):
            mutations = json_mutations(data)
        else:
            mutations = binary_mutations(data, name.endswith(".safetensors"), seed=len(name))
        for label, damaged in mutations:
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(pristine, work)
            (work / folder / name).write_bytes(damaged)
            started = time.monotonic()
            status, detail = run([str(work / a) if (work / a).exists() or a == "out" else a for a in relative_args])
            took = time.monotonic() - started
            worst = max(worst, (took, f"{folder}/{name} {label}"))
            counts[status] = counts.get(status, 0) + 1
            per_folder.setdefault(folder, {}).setdefault(status, 0)
            per_folder[folder][status] += 1
            if status in ("TRACEBACK", "MULTILINE"):
                key = detail.split(": ", 1)[0]
                results.setdefault(key, []).append(f"{folder}/{name} {label}: {detail}")
            n += 1
            if opts.limit and n >= opts.limit:
                break
    print(f"{n} cases: {counts}; slowest {worst[0]:.1f} s ({worst[1]})")
    for folder, c in per_folder.items():
        print(f"  {folder}: {c}")
    for key, cases in sorted(results.items()):
        print(f"\n{key} ({len(cases)} cases)")
        for c in cases[:3]:
            print(f"  {c}")
    return 1 if results else 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main_sweep())
