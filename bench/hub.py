"""The hub benchmark (issue 12): merge-and-push as one stream, against the project's local Hub throttled like a
network link, compared with the time the same bytes take to move with the ``hf`` CLI at the same rate.

    python -m bench.hub [--shape 1b|7b] [--rates 80MB,400MB] [--adapter local|hub] [--shard-mb 450] [--repeat 3]
                        [--base-format safetensors|bin]

Generates (once, under ``bench/work/``) the shape's random base in ~450 MB safetensors (or ``.bin``) shards and its
Chinese-LLaMA-style adapter, puts them into a fresh local Hub, then for each rate starts the Hub in a child process
(``python -m hubmerge.testing.localhub --bandwidth RATE``: that rate in each direction, shared by all transfers) and
times, each in a child process with an empty cache:

* ``download``: ``hf download BASE`` (every file of the base);
* ``upload``: ``hf upload NEW_REPO BASE_FOLDER`` (the same files into a new repo);
* ``stream``: ``hubmerge ADAPTER --base BASE --push-to NEW_REPO --no-keep-downloads`` run in an empty folder; its
  peak disk (the cache and that folder, allocated blocks, polled every 50 ms) is recorded too.

The three run in ``--repeat`` interleaved rounds (after an ``os.sync()`` each) and the table shows medians: on a
shared 2-core machine one run of the same command varies by a second or more. Each run's CPU seconds are recorded
too, its own and the local Hub's meanwhile: both share the machine's cores, so the stream's total over the cores is
a wall time no schedule can beat here (``cpu_bound_s``), to hold against the target.

The target is ``stream <= 1.3 x max(download, upload)`` and a peak disk of at most 1.2 GB for the 1b shape (2.2 GB
of weights). The adapter is a local folder by default (the floor moves only the base's bytes); ``--adapter hub``
downloads it from the Hub as well. Results go to the terminal and ``bench/results/hub-<shape>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.shapes import SHAPES, folder_bytes, input_folders, result_path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = {"wall_over_floor": 1.3, "peak_disk_gb": {"1b": 1.2}}
BASE_REPO, ADAPTER_REPO = "bench/base", "bench/adapter"


def _rate(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    unit = text[-2:].upper()
    return int(float(text[:-2]) * units[unit]) if unit in units else int(text)


def seed_hub(root: Path, base: Path, adapter: Path, token: str) -> None:
    """A fresh local Hub state under ``root``: user ``bench`` (with ``token``) owning the base and adapter repos.
    Files are committed straight into its storage (no HTTP, so not throttled)."""
    from hubmerge.testing.localhub import LocalHub

    shutil.rmtree(root, ignore_errors=True)
    hub = LocalHub(root)
    hub.add_user("bench", token=token)
    for repo, folder in ((BASE_REPO, base), (ADAPTER_REPO, adapter)):
        hub.create_repo(repo)
        hub.commit_files(repo, {p.name: p for p in sorted(folder.iterdir()) if p.is_file()})


class Server:
    """The local Hub in a child process at ``rate`` bytes/s each way."""

    def __init__(self, root: Path, rate: int, log: Path):
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hubmerge.testing.localhub", "--root", str(root), "--bandwidth", str(rate)],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        )
        self.url = self.proc.stdout.readline().decode().strip()
        if not self.url.startswith("http"):
            raise RuntimeError(f"the local Hub did not start; see {log}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._log.close()


def disk_bytes(folders: list[Path], pid: int | None = None) -> int:
    """Allocated bytes of every file under ``folders`` (what the disk really holds, sparse or not), and of the files
    there that process ``pid`` removed but still holds open (a shard being uploaded keeps its space until then)."""
    total = 0
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
                except OSError:  # removed meanwhile
                    pass
    fds, roots = Path(f"/proc/{pid}/fd"), [os.path.realpath(f) for f in folders]
    for fd in os.listdir(fds) if pid is not None and fds.exists() else []:
        try:
            target = os.readlink(fds / fd)
            if target.endswith(" (deleted)") and any(target.startswith(f"{r}/") for r in roots):
                total += os.stat(fds / fd).st_blocks * 512
        except OSError:  # closed meanwhile
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(
    cmd: list[str], env: dict, cwd: Path, log: Path, watch: list[Path] | None = None, server: int | None = None
) -> dict:
    """Run ``cmd``; wall time, exit status, CPU seconds (its own and, given its pid, the ``server``'s meanwhile)
    and (with ``watch``) the peak disk of those folders, polled."""
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], disk_bytes(watch or [], proc.pid))

    watcher = threading.Thread(target=poll, daemon=True)
    os.sync()  # the previous command's writes reach the disk now, not during this one
    load = os.getloadavg()[0]
    server_cpu = cpu_seconds(server) if server else 0.0
    with open(log, "wb") as f:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        if watch:
            watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (its CPU time; not its peak RSS)
        wall = time.monotonic() - started
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    done.set()
    if watch:
        watcher.join()
    result = {
        "wall_s": round(wall, 2),
        "exit": code,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "log": str(log),
        "loadavg_before": round(load, 2),
    }
    if server:
        result["hub_cpu_s"] = round(cpu_seconds(server) - server_cpu, 2)
    if watch:
        result["peak_disk_gb"] = round(peak[0] / 1e9, 3)
    return result


def drop_repo(url: str, token: str, repo_id: str) -> None:
    """Delete a repo a timed command made (after the timing), if it exists."""
    from huggingface_hub import HfApi

    HfApi(endpoint=url, token=token).delete_repo(repo_id, missing_ok=True)


def _median(items: list, key) -> Any:
    """The median item by ``key`` (the lower one of an even count: a round that ran, not an average)."""
    return sorted(items, key=key)[(len(items) - 1) // 2]


def median_run(done: list[dict]) -> dict:
    """One command's rounds as one result: the median wall time (every round's kept) and CPU times, the worst exit
    status and peak disk, and the log of the median round."""
    mid = _median(done, lambda r: r["wall_s"])
    result = {**mid, "walls_s": [r["wall_s"] for r in done], "exit": max(r["exit"] for r in done)}
    for key in ("cpu_s", "hub_cpu_s"):
        if key in mid:
            result[key] = _median([r[key] for r in done], float)
    if "peak_disk_gb" in mid:
        result["peak_disk_gb"] = max(r["peak_disk_gb"] for r in done)
    return result


def run_rate(rate: int, args, base: Path, adapter: Path, token: str, hub_root: Path, scratch: Path) -> dict:
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = Server(hub_root, rate, logs / f"localhub-{rate}.log")
    tag = f"{rate // 10**6}mb"
    try:
        env = {
            **os.environ,
            "HF_ENDPOINT": server.url,
            "HF_TOKEN": token,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HOME": str(scratch / "hf-home"),
            "NO_PROXY": "127.0.0.1,localhost",
            "PYTHONPATH": str(ROOT),
        }
        cache, cwd = scratch / "cache", scratch / "cwd"
        rounds: dict[str, list[dict]] = {"download": [], "upload": [], "stream": []}
        for k in range(args.repeat):  # interleaved rounds: a slow spell of the machine touches all three alike
            for name, cmd in (
                ("download", ["hf", "download", BASE_REPO, "--cache-dir", str(cache), "--quiet"]),
                ("upload", ["hf", "upload", f"bench/upload-{tag}-{k}", str(base), ".", "--private", "--quiet"]),
                (
                    "stream",
                    [
                        sys.executable,
                        "-m",
                        "hubmerge.cli",
                        ADAPTER_REPO if args.adapter == "hub" else str(adapter),
                        "--base",
                        BASE_REPO,
                        "--push-to",
                        f"bench/merged-{tag}-{k}",
                        "--no-keep-downloads",
                        "--cache-dir",
                        str(cache),
                    ],
                ),
            ):
                for folder in (cache, cwd):
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir(parents=True)
                watch = [cache, cwd] if name == "stream" else None
                rounds[name].append(timed(cmd, env, cwd, logs / f"{name}-{tag}-{k}.log", watch, server.proc.pid))
                print(f"{format_rate(rate)} {name:<8} {rounds[name][-1]['wall_s']:8.2f} s", flush=True)
                if name != "download":  # untimed: the local Hub's disk holds one model at a time (7b: 13.5 GB)
                    drop_repo(server.url, token, f"bench/{'upload' if name == 'upload' else 'merged'}-{tag}-{k}")
        runs = {name: median_run(done) for name, done in rounds.items()}
        summary = Path(runs["stream"]["log"]).read_text(errors="replace").splitlines()
        runs["stream"]["summary"] = [line for line in summary if line.startswith(("stream:", "time:", "published:"))]
        floor = max(runs["download"]["wall_s"], runs["upload"]["wall_s"])
        stream, cores = runs["stream"], os.cpu_count() or 1
        return {
            "rate_bytes_s": rate,
            "runs": runs,
            "floor_s": floor,
            "wall_over_floor": round(stream["wall_s"] / floor, 2),
            # The stream's CPU time and the local Hub's spread over every core: no schedule of that work on this
            # machine ends sooner. Near 1.3 x floor, the target asks for more than the machine has.
            "cores": cores,
            "cpu_bound_s": round((stream["cpu_s"] + stream["hub_cpu_s"]) / cores, 2),
        }
    finally:
        server.stop()
        for folder in (scratch / "cache", scratch / "cwd"):
            shutil.rmtree(folder, ignore_errors=True)


def format_rate(rate: int) -> str:
    return f"{rate / 1e6:.0f} MB/s"


def table(result: dict) -> str:
    lines = [
        f"hub benchmark, shape {result['shape']}: base {result['inputs']['base_gb']} GB in "
        f"{result['inputs']['base_shards']} {result['inputs'].get('base_format', 'safetensors')} shards, "
        f"adapter {result['inputs']['adapter_gb']} GB ({result['adapter']})",
        "",
        f"{'rate':>10} {'hf download s':>14} {'hf upload s':>12} {'stream s':>9} {'stream/max':>11} {'peak disk GB':>13}",
    ]
    for r in result["rates"]:
        runs = r["runs"]
        failed = [n for n, x in runs.items() if x["exit"] != 0]
        lines.append(
            f"{format_rate(r['rate_bytes_s']):>10} {runs['download']['wall_s']:>14.2f} {runs['upload']['wall_s']:>12.2f} "
            f"{runs['stream']['wall_s']:>9.2f} {r['wall_over_floor']:>11.2f} {runs['stream']['peak_disk_gb']:>13.2f}"
            + (f"  FAILED: {', '.join(failed)}" if failed else "")
        )
    lines += ["", "CPU seconds (the command + the local Hub meanwhile), medians:"]
    for r in result["rates"]:
        cpu = " ".join(f"{n} {x['cpu_s']:.1f} + {x['hub_cpu_s']:.1f};" for n, x in r["runs"].items())
        lines.append(
            f"{format_rate(r['rate_bytes_s']):>10} {cpu} stream's CPU over {r['cores']} cores: {r['cpu_bound_s']:.2f} s"
            f" = {r['cpu_bound_s'] / r['floor_s']:.2f} x max"
        )
    lines += ["", "targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in result["targets_met"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hub", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--rates", default="80MB,400MB", help="comma-separated link rates (default 80MB,400MB)")
    p.add_argument("--adapter", choices=("local", "hub"), default="local", help="where the adapter comes from")
    p.add_argument("--shard-mb", type=int, default=450, help="base shard size in MB (default 450)")
    p.add_argument("--base-format", choices=("safetensors", "bin"), default="safetensors", help="the base's shards")
    p.add_argument("--repeat", type=int, default=3, help="rounds of the three commands per rate; medians (default 3)")
    p.add_argument("--work", type=Path, default=HERE / "work", help="inputs and scratch (default bench/work)")
    p.add_argument("--results", type=Path, default=HERE / "results", help="where the JSON goes")
    args = p.parse_args(argv)

    shard_bytes = args.shard_mb * 10**6
    subprocess.run(
        [sys.executable, "-m", "bench.gen", "--shape", args.shape, "--work", str(args.work)]
        + ["--shard-bytes", str(shard_bytes), "--base-format", args.base_format],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    import dataclasses

    shape = dataclasses.replace(SHAPES[args.shape], shard_bytes=shard_bytes, weights=args.base_format)
    base, adapters = input_folders(args.work, shape)
    weights = shape.weights
    adapter = adapters[0]  # one Chinese-style adapter (the 7b shape's first: llama-plus)
    scratch = args.work / shape.name / "hub-run"
    hub_root = scratch / "hub"
    token = "hf_bench" + secrets.token_hex(12)
    print(f"seeding a local Hub with {base.name} and {adapter.name} ...", flush=True)
    seed_hub(hub_root, base, adapter, token)
    rates = [_rate(r) for r in args.rates.split(",") if r]
    try:
        results = [run_rate(rate, args, base, adapter, token, hub_root, scratch) for rate in rates]
    finally:
        shutil.rmtree(hub_root, ignore_errors=True)
    date = datetime.date.today().isoformat()
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    limit = TARGETS["peak_disk_gb"].get(shape.name)
    targets = {}
    for r in results:
        rate = format_rate(r["rate_bytes_s"])
        targets[f"{rate} stream/max<={TARGETS['wall_over_floor']}"] = r["wall_over_floor"] <= TARGETS["wall_over_floor"]
        if limit:
            targets[f"{rate} peak disk<={limit}GB"] = r["runs"]["stream"]["peak_disk_gb"] <= limit
    result = {
        "shape": shape.name,
        "date": date,
        "commit": commit,
        "adapter": f"{args.adapter} folder" if args.adapter == "local" else "downloaded from the Hub",
        "inputs": {
            "base_gb": round(folder_bytes(base, f"*.{weights}") / 1e9, 2),
            "base_shards": len(list(base.glob(f"*.{weights}"))),
            "base_format": weights,
            "adapter_gb": round(folder_bytes(adapter) / 1e9, 2),
        },
        "rates": results,
        "targets_met": targets,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = result_path(args.results, f"hub-{shape.name}{'' if weights == 'safetensors' else '-' + weights}-{date}")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(result))
    for r in results:
        for line in r["runs"]["stream"].get("summary", []):
            print(f"  {format_rate(r['rate_bytes_s'])}: {line}")
    print(f"\nwrote {path}")
    return 0 if all(x["exit"] == 0 for r in results for x in r["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
