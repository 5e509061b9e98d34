"""Nothing lost, nothing half-written: kills at random points, Ctrl-C, a disk that fills up mid-write, a preflight
that refuses. Every run is the real command in its own process on a model big enough (~300 MB) to be caught
mid-write; inputs are hashed before and after to prove they were never touched."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import cli, cli_command

import hubmerge
from hubmerge.verification.hashing import file_digest

SHARD = "24MB"


@pytest.fixture(scope="module")
def medium(models):
    """A ~300 MB fp16 base and an adapter on every linear layer, so a merge takes a few seconds."""
    base = models.base(hidden=1024, layers=12, heads=8, intermediate=2752)
    return base, models.adapter(base, r=8, alpha=16, seed=61)


def tree_digests(*folders: Path) -> dict[str, str]:
    return {str(p): file_digest(p) for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def start(args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def wait_for_shards(staging: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until ``count`` shard files exist in the staging folder (the merge is writing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(staging.glob("model-*.safetensors"))) >= count or proc.poll() is not None:
            return
        time.sleep(0.02)
    raise AssertionError("the merge never started writing")


def test_killed_runs_resume_to_a_byte_identical_result(medium, tmp_path):
    base, adapter = medium
    before = tree_digests(base, adapter)
    reference = tmp_path / "reference"
    done = cli(adapter, "--base", base, "--out", reference, "--max-shard-size", SHARD, "-q", timeout=600)
    assert done.returncode == 0, done.stderr
    shards = len(list(reference.glob("model-*.safetensors")))
    assert shards >= 8

    out = tmp_path / "merged"
    staging = tmp_path / ".merged.hubmerge-partial"
    rng = random.Random(1234)
    kills = 0
    for _attempt in range(4):
        proc = start([adapter, "--base", base, "--out", out, "--max-shard-size", SHARD])
        wait_for_shards(staging, rng.randint(1, shards - 2), proc)
        time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        if proc.returncode == 0:  # finished before the kill landed: nothing left to interrupt
            break
        assert not out.exists(), "a killed run must not leave an output folder"
    assert kills >= 3
    journal = json.loads((staging / ".hubmerge-journal.json").read_text())
    assert journal["files"], "finished shards are recorded as they complete"

    final = cli(adapter, "--base", base, "--out", out, "--max-shard-size", SHARD, timeout=600)
    assert final.returncode == 0, final.stderr
    assert "resumed: kept" in final.stdout
    assert not staging.exists()
    ours = {p.relative_to(out).as_posix(): file_digest(p) for p in out.rglob("*") if p.is_file()}
    want = {p.relative_to(reference).as_posix(): file_digest(p) for p in reference.rglob("*") if p.is_file()}
    assert ours == want  # byte-identical, hubmerge.json included
    assert tree_digests(base, adapter) == before


def test_ctrl_c_stops_cleanly_and_the_rerun_resumes(medium, tmp_path):
    base, adapter = medium
    out, staging = tmp_path / "merged", tmp_path / ".merged.hubmerge-partial"
    proc = start([adapter, "--base", base, "--out", out, "--max-shard-size", SHARD, "-q"])
    wait_for_shards(staging, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: ") and "run the same command again" in lines[0]
    assert not out.exists() and staging.is_dir()
    rerun = cli(adapter, "--base", base, "--out", out, "--max-shard-size", SHARD, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed: kept" in rerun.stdout and not staging.exists()
    recipe = json.loads((out / "hubmerge.json").read_text())
    assert all(file_digest(out / name) == digest for name, digest in recipe["files"].items())


def test_a_different_command_does_not_reuse_a_stale_partial(medium, tmp_path):
    base, adapter = medium
    out, staging = tmp_path / "merged", tmp_path / ".merged.hubmerge-partial"
    proc = start([adapter, "--base", base, "--out", out, "--max-shard-size", SHARD, "-q"])
    wait_for_shards(staging, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    other = cli(adapter, "--base", base, "--out", out, "--max-shard-size", SHARD, "--dtype", "bfloat16", timeout=600)
    assert other.returncode == 0, other.stderr
    assert "resumed" not in other.stdout, other.stdout
    assert (
        json.loads((out / "config.json").read_text())[
            "dtype" if "dtype" in json.loads((base / "config.json").read_text()) else "torch_dtype"
        ]
        == "bfloat16"
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 400 MB tmpfs: a real, small filesystem (root only, as CI runs)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root (CI runs as root)")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_filling_up_mid_write_leaves_nothing_and_inputs_intact(medium, small_disk, tmp_path):
    base, adapter = medium
    before = tree_digests(base, adapter)
    out, staging = small_disk / "merged", small_disk / ".merged.hubmerge-partial"
    proc = start([adapter, "--base", base, "--out", out, "--max-shard-size", SHARD, "-q"])
    wait_for_shards(staging, 2, proc)
    with open(small_disk / "someone-elses-file", "wb") as filler:  # another program takes the remaining space
        size = 0
        try:
            while True:
                os.posix_fallocate(filler.fileno(), size, 4 * 2**20)
                size += 4 * 2**20
        except OSError:
            pass  # the disk is full (the merge keeps writing meanwhile, so it hits the wall too)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "the disk filled up while writing" in lines[0] and "free some space" in lines[0], err
    assert not out.exists() and not staging.exists()
    assert sorted(p.name for p in small_disk.iterdir()) == ["someone-elses-file"]
    assert tree_digests(base, adapter) == before


def test_preflight_refuses_a_disk_too_small_before_writing(medium, small_disk, tmp_path):
    base, adapter = medium
    with open(small_disk / "filler", "wb") as filler:
        os.posix_fallocate(filler.fileno(), 0, 300 * 2**20)
    done = cli(adapter, "--base", base, "--out", small_disk / "merged", timeout=600)
    assert done.returncode == 1
    line = done.stderr.strip()
    assert line.startswith("error: ") and "free but the output need" in line and "MB" in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_preflight_refuses_when_memory_is_short(models, tmp_path, monkeypatch):
    # The kernel's MemAvailable is the one input faked here: making this machine short of memory for real would
    # disturb everything else running on it.
    import hubmerge.resources as resources

    base = models.base()
    adapter = models.adapter(base, seed=62)
    monkeypatch.setattr(resources, "available_memory", lambda: 64 * 2**20)
    with pytest.raises(hubmerge.OutputError, match=r"needs about \d+\.\d MB of memory but 67\.1 MB is available"):
        hubmerge.merge([adapter], base, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
