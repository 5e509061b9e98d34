"""The merge benchmark: hubmerge against the disk's floor and against today's path.

    python -m bench.run [--shape 1b|7b] [--repeat N] [--cold] [--skip-today] [--plot]

Generates (once, cached under ``bench/work/``) a random LLaMA-shaped base and Chinese-LLaMA-style 2023 adapters,
then runs, round-robin and each ``--repeat`` times, every variant in a child process:

* ``hf``: ``hubmerge ADAPTERS --base BASE --format hf`` (sharded safetensors), a first run: the hash cache
  (``HUBMERGE_HASH_CACHE``) starts empty, so every input is read and hashed;
* ``rerun``: the same command again over the same inputs: their SHA256 come from the hash cache (primed by one
  untimed run);
* ``pth``: the same with ``--format pth`` (Meta/llama.cpp consolidated.NN.pth);
* ``gguf``, ``gguf-q8_0``: the same with ``--format gguf`` (f16) and ``--format gguf:q8_0`` (quantized in the pass);
* ``today``: the seed's script on current libraries (``bench/today.py``: transformers fp16 load + PEFT
  merge_and_unload + save_pretrained);
* ``floor``: ``cp`` of the base's weight files + ``sync``, the time any merge needs to read and write that much
  (issue 12's reference);
* ``device``: the same bytes written with ``dd oflag=direct`` + ``sync``: the disk's own speed, without the page
  cache. On a virtual machine the ``cp`` floor swings with the cost of fresh page-cache pages (0.3 CPU-s per GB when
  the guest reuses pages it freed moments ago, 2.4-3.8 when the host must back them again, measured); this one does
  not. It is printed for reference; no target uses it.

Wall time and peak RSS come from the OS (``os.wait4``'s rusage of the child). With ``--cold`` the page cache is
dropped before every run (needs root); otherwise inputs are read once before each run so that every variant starts
warm. Results go to the terminal and to ``bench/results/<shape>-<date>.json`` (``--plot``: also a PNG), and the last
``hf`` output is compared with the last ``today`` output tensor for tensor (at most one fp16 ulp apart).
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.shapes import SHAPES, folder_bytes, input_folders, result_path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# hubmerge variants -> their --format ("rerun": hf again, over inputs the hash cache knows)
FORMATS = {"hf": "hf", "rerun": "hf", "pth": "pth", "gguf": "gguf", "gguf-q8_0": "gguf:q8_0"}
VARIANTS = (*FORMATS, "today", "floor", "device")
TARGETS = {  # issue 12: a first run within 2x the copy floor, warm or cold, a second run within 1.5x
    "1b": {"wall_over_floor": 2.0, "rerun_over_floor": 1.5, "peak_rss_gb": 0.8},
    "7b": {"wall_over_floor": 2.0, "rerun_over_floor": 1.5, "peak_rss_gb": 1.2},
    "pth_over_hf": 1.3,
}
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
TIME = "/usr/bin/time"  # GNU time


def can_drop_caches() -> bool:
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = (
        int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            )
        )
        * 1024
    )
    disk = shutil.disk_usage(HERE)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(mem / 1e9, 1),
        "kernel": platform.release(),
        "disk_gb": round(disk.total / 1e9),
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "transformers": importlib.metadata.version("transformers"),
        "peft": importlib.metadata.version("peft"),
    }


def commands(variant: str, base: Path, adapters: list[Path], out: Path) -> list[str]:
    if variant in FORMATS:
        return [
            sys.executable,
            "-m",
            "hubmerge.cli",
            *map(str, adapters),
            "--base",
            str(base),
            "--out",
            str(out),
            "--format",
            FORMATS[variant],
            "--quiet",
            "--overwrite",
        ]
    if variant == "today":
        return [sys.executable, str(HERE / "today.py"), "--base", str(base), "--out", str(out), *map(str, adapters)]
    weights = sorted(base.glob("*.safetensors"))
    if variant == "device":
        copies = " && ".join(f"dd if='{w}' of='{out}/{w.name}' bs=16M oflag=direct status=none" for w in weights)
        return ["sh", "-c", f"mkdir -p '{out}' && {copies} && sync"]
    names = " ".join(f"'{w}'" for w in weights)
    return ["sh", "-c", f"mkdir -p '{out}' && cp {names} '{out}/' && sync"]


def run_child(cmd: list[str], log: Path, hash_cache: Path) -> dict:
    """Run ``cmd`` under GNU time; wall time from here, peak RSS and CPU time of the child (and its waited-for
    children) from the OS's rusage as /usr/bin/time reports it.

    Not ``os.wait4`` on a child of this process: Linux starts a child's ru_maxrss at its parent's peak (it is kept
    across fork and exec), so a child of a big parent reports the parent's memory as its own. ``time`` is small.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HUBMERGE_HASH_CACHE": str(hash_cache),
    }
    load = os.getloadavg()[0]
    usage = log.with_suffix(".time")
    with open(log, "wb") as f:
        started = time.monotonic()
        code = subprocess.call(
            [TIME, "-f", "%M %U %S", "-o", str(usage), *cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
        wall = time.monotonic() - started
    last = usage.read_text().split("\n")[-2].split()  # "Command exited with non-zero status N" may come first
    peak_kb, user, system = int(last[0]), float(last[1]), float(last[2])
    return {
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "cpu_s": round(user + system, 2),
        "exit": code,
        "loadavg_before": round(load, 2),
    }


def warm(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as f:
            while f.read(64 * 2**20):
                pass


def ulp_compare(ours: Path, theirs: Path) -> dict:
    """Compare two HF safetensors folders tensor by tensor: names, shapes, dtypes, and the largest distance in
    units in the last place (fp16 bit patterns as ordered integers)."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        found = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                found.update(dict.fromkeys(st.keys(), f))
        return found

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    a, b = index(ours), index(theirs)
    report = {
        "tensors": len(a),
        "same_names": sorted(a) == sorted(b),
        "identical": 0,
        "max_ulp": 0,
        "elements_differing": 0,
        "worst": None,
        "problems": [],
    }
    for name in sorted(set(a) & set(b)):
        with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.shape != y.shape or x.dtype != y.dtype:
            report["problems"].append(f"{name}: {list(x.shape)} {x.dtype} vs {list(y.shape)} {y.dtype}")
            continue
        if torch.equal(x.view(torch.int16), y.view(torch.int16)):
            report["identical"] += 1
            continue
        dist = (ordered(x) - ordered(y)).abs()
        worst = int(dist.max())
        report["elements_differing"] += int((dist > 0).sum())
        if worst > report["max_ulp"]:
            report["max_ulp"], report["worst"] = worst, name
    report["problems"] += [f"{n}: only in hubmerge's output" for n in sorted(set(a) - set(b))]
    report["problems"] += [f"{n}: only in today's output" for n in sorted(set(b) - set(a))]
    report["ok"] = report["same_names"] and not report["problems"] and report["max_ulp"] <= 1
    return report


def summarize(runs: list[dict], shape: str) -> dict:
    med = {}
    for v in VARIANTS:
        ok = [r for r in runs if r["variant"] == v and r["exit"] == 0]
        if ok:
            med[v] = {
                "wall_s": round(statistics.median(r["wall_s"] for r in ok), 2),
                "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in ok), 1),
                "cpu_s": round(statistics.median(r["cpu_s"] for r in ok), 2),
                "runs": len(ok),
            }
    ratios = {}

    def ratio(key: str, num: str, den: str, field: str = "wall_s") -> None:
        if num in med and den in med:
            ratios[key] = round(med[num][field] / med[den][field], 2)

    ratio("hf_wall_over_floor", "hf", "floor")
    ratio("rerun_wall_over_floor", "rerun", "floor")
    ratio("pth_wall_over_floor", "pth", "floor")
    ratio("hf_wall_over_device", "hf", "device")
    ratio("rerun_wall_over_device", "rerun", "device")
    ratio("pth_wall_over_hf", "pth", "hf")
    ratio("gguf_q8_0_wall_over_gguf_f16", "gguf-q8_0", "gguf")
    ratio("today_wall_over_hf", "today", "hf")
    ratio("today_rss_over_hf", "today", "hf", "peak_rss_mb")
    t = TARGETS[shape]
    targets = {}
    for v in ("hf", "rerun", "pth"):
        limit = t["rerun_over_floor" if v == "rerun" else "wall_over_floor"]
        if v in med and "floor" in med:
            targets[f"{v}_wall_over_floor<={limit}"] = ratios[f"{v}_wall_over_floor"] <= limit
        if v in med:
            targets[f"{v}_peak_rss<={t['peak_rss_gb']}GB"] = med[v]["peak_rss_mb"] * 2**20 <= t["peak_rss_gb"] * 1e9
    if "pth_wall_over_hf" in ratios:
        targets[f"pth_wall_over_hf<={TARGETS['pth_over_hf']}"] = ratios["pth_wall_over_hf"] <= TARGETS["pth_over_hf"]
    return {"medians": med, "ratios": ratios, "targets_met": targets}


def table(result: dict) -> str:
    lines = [
        f"shape {result['shape']}: base {result['inputs']['base_weights_gb']} GB of weights, adapters "
        f"{', '.join(f'{k} {v} GB' for k, v in result['inputs']['adapters_gb'].items())}; "
        f"cache: {result['cache']}",
        "",
    ]
    lines.append(f"{'round':>5}  {'variant':<9} {'wall s':>8} {'peak RSS MB':>12} {'CPU s':>7} {'load':>5}")
    for r in result["runs"]:
        flag = "" if r["exit"] == 0 else f"  FAILED (exit {r['exit']}, log {r['log']})"
        lines.append(
            f"{r['round']:>5}  {r['variant']:<9} {r['wall_s']:>8.2f} {r['peak_rss_mb']:>12.0f} "
            f"{r['cpu_s']:>7.1f} {r['loadavg_before']:>5.1f}{flag}"
        )
    lines += ["", f"{'median':<10} {'wall s':>8} {'peak RSS MB':>12} {'CPU s':>7} {'wall/floor':>11}"]
    med = result["summary"]["medians"]
    for v, m in med.items():
        rel = f"{m['wall_s'] / med['floor']['wall_s']:.2f}" if "floor" in med else "-"
        lines.append(f"{v:<10} {m['wall_s']:>8.2f} {m['peak_rss_mb']:>12.0f} {m['cpu_s']:>7.1f} {rel:>11}")
    lines += ["", "ratios: " + ", ".join(f"{k} {v}" for k, v in result["summary"]["ratios"].items())]
    lines += [
        "targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in result["summary"]["targets_met"].items())
    ]
    check = result.get("check")
    if check:
        lines.append(
            f"hf output vs today's: {check['tensors']} tensors, {check['identical']} bit-identical, max "
            f"{check['max_ulp']} ulp ({check['elements_differing']} elements differ"
            f"{', worst ' + check['worst'] if check['worst'] else ''}): {'OK' if check['ok'] else 'FAIL'}"
            + "".join(f"\n  {p}" for p in check["problems"][:10])
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in VARIANTS if v in result["summary"]["medians"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, field, label in ((axes[0], "wall_s", "wall time (s)"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
        meds = [result["summary"]["medians"][v][field] for v in variants]
        colors = [{"today": "#c54", "floor": "#888", "device": "#888"}.get(v, "#2a7") for v in variants]
        ax.bar(variants, meds, color=colors, alpha=0.6)
        for i, v in enumerate(variants):
            ys = [r[field] for r in result["runs"] if r["variant"] == v and r["exit"] == 0]
            ax.scatter([i] * len(ys), ys, color="k", s=12, zorder=3)
        ax.set_ylabel(label)
    fig.suptitle(
        f"hubmerge benchmark, {result['shape']} ({result['cache']}), {result['date']}: medians (bars) and runs (dots)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--repeat", type=int, default=3, help="runs of each variant (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--skip-today", action="store_true", help="leave out today's path (7b needs ~20 GB of RAM)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before every run (root only)")
    p.add_argument("--plot", action="store_true", help="also write a matplotlib PNG next to the JSON")
    p.add_argument("--work", type=Path, default=HERE / "work", help="inputs and outputs (default bench/work)")
    p.add_argument("--results", type=Path, default=HERE / "results", help="where the JSON goes")
    args = p.parse_args(argv)

    variants = [v for v in args.variants.split(",") if v and not (args.skip_today and v == "today")]
    if bad := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown variants {bad}")
    if args.cold and not can_drop_caches():
        p.error("--cold needs write access to /proc/sys/vm/drop_caches (root)")
    shape = SHAPES[args.shape]
    # Byte-compiled as an install leaves it, even where PYTHONDONTWRITEBYTECODE keeps the runs from writing .pyc.
    compileall.compile_dir(ROOT / "hubmerge", quiet=1)
    print(f"inputs: generating or reusing {args.work / shape.name} ...", flush=True)
    # In a child process: this one stays small (see run_child) and never imports torch before the runs.
    subprocess.run(
        [sys.executable, "-m", "bench.gen", "--shape", shape.name, "--work", str(args.work)], check=True, cwd=ROOT
    )
    base, adapters = input_folders(args.work, shape)
    base_files = sorted(base.glob("*.safetensors"))
    inputs = base_files + [a / "adapter_model.bin" for a in adapters]
    outputs = args.work / shape.name / "out"
    logs = args.work / shape.name / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(outputs, ignore_errors=True)
    check = "today" in variants and "hf" in variants
    known = logs / "hash-cache-rerun.json"  # the rerun's: knows the inputs
    fresh = logs / "hash-cache-first.json"  # emptied before every other run
    known.unlink(missing_ok=True)
    if "rerun" in variants:
        print("priming the hash cache with one untimed run ...", flush=True)
        run_child(commands("rerun", base, adapters, outputs / "rerun"), logs / "prime.log", known)
        shutil.rmtree(outputs / "rerun", ignore_errors=True)

    runs = []
    for rnd in range(1, args.repeat + 1):
        order = variants[rnd - 1 :] + variants[: rnd - 1]  # rotate: no variant always runs first
        for v in order:
            out = outputs / v
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            if args.cold:
                DROP_CACHES.write_text("3\n")
            else:
                warm(inputs)
            log = logs / f"{v}-{rnd}.log"
            fresh.unlink(missing_ok=True)
            r = {
                "round": rnd,
                "variant": v,
                **run_child(commands(v, base, adapters, out), log, known if v == "rerun" else fresh),
                "log": str(log),
            }
            runs.append(r)
            print(
                f"round {rnd} {v:<9} {r['wall_s']:8.2f} s {r['peak_rss_mb']:8.0f} MB"
                f"{'' if r['exit'] == 0 else '  FAILED: see ' + str(log)}",
                flush=True,
            )
            if not (check and v in ("hf", "today")):
                shutil.rmtree(out, ignore_errors=True)

    date = datetime.date.today().isoformat()
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    result = {
        "shape": shape.name,
        "date": date,
        "commit": commit,
        "cache": "cold (page cache dropped before each run)"
        if args.cold
        else "warm (inputs read once before each run)",
        "repeat": args.repeat,
        "machine": machine(),
        "inputs": {
            "base_weights_gb": round(sum(f.stat().st_size for f in base_files) / 1e9, 2),
            "base_shards": len(base_files),
            "adapters_gb": {a.name: round(folder_bytes(a) / 1e9, 2) for a in adapters},
            "shape": {k: getattr(shape, k) for k in ("hidden", "layers", "intermediate", "heads", "kv_heads")},
            "adapter_specs": [{"name": s.name, "r": s.r, "alpha": s.alpha, "vocab": s.vocab} for s in shape.adapters],
        },
        "variants": {
            v: " ".join(commands(v, Path("BASE"), [Path(f"ADAPTER{i + 1}") for i in range(len(adapters))], Path("OUT")))
            for v in variants
        },
        "runs": runs,
    }
    if (outputs / "hf").is_dir():
        result["output_gb"] = round(folder_bytes(outputs / "hf", "*.safetensors") / 1e9, 2)
    result["summary"] = summarize(runs, shape.name)
    if check and (outputs / "hf").is_dir() and (outputs / "today").is_dir():
        print("comparing hubmerge's hf output with today's, tensor by tensor ...", flush=True)
        result["check"] = ulp_compare(outputs / "hf", outputs / "today")
    shutil.rmtree(outputs, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = result_path(args.results, f"{shape.name}-{date}")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(result))
    print(f"\nwrote {json_path}")
    if args.plot:
        plot(result, json_path.with_suffix(".png"))
        print(f"wrote {json_path.with_suffix('.png')}")
    failed = [r for r in runs if r["exit"] != 0]
    return 1 if failed or (result.get("check") and not result["check"]["ok"]) else 0


if __name__ == "__main__":
    sys.exit(main())
