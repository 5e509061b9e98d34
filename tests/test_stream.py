"""Merge-and-push as one stream (hubmerge/stream.py), against the project's local Hub through the real client:
the same files as a non-streamed run, bounded disk, resume without re-uploading, no repo left by a failure, and the
cache left as it was found."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download
from support import ALPACA_REPO as ALPACA
from support import LLAMA_REPO as LLAMA
from support import hubmerge, one_line_error

from hubmerge import merge
from hubmerge import stream as streaming
from hubmerge.errors import VerificationError
from hubmerge.sizes import parse_size
from hubmerge.tensorio.output import HeldFiles
from hubmerge.testing.localhub import LocalHub

SHARDED = "alice/llama-tiny-sharded"
SHARDS = [f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)]
OUT_SHARD = "40KB"  # the tiny merged model is ~290 kB: several output shards


def _publish(server, models, token_owner: str = "alice") -> None:
    """The tiny Plus recipe with a base in 4 safetensors shards, committed straight into ``server``'s storage."""
    base = models.base(shards=4)
    llama, alpaca = models.plus_recipe(models.base())
    for repo, folder, private in ((SHARDED, base, True), (LLAMA, llama, False), (ALPACA, alpaca, False)):
        try:
            server.create_repo(repo, private=private)
        except Exception:  # published by an earlier test on the shared Hub
            continue
        server.commit_files(repo, {p.name: p for p in sorted(folder.iterdir()) if p.is_file()})


@pytest.fixture
def shared(hub, models):
    _publish(hub, models)
    return hub


def _throttled_hub(tmp_path, models, monkeypatch, rate: int):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with LocalHub(tmp_path / "slow-hub", bandwidth=rate) as server:
        server.tokens = {name: server.add_user(name) for name in ("hfl", "alice")}
        _publish(server, models)
        yield server


@pytest.fixture
def slow_hub(tmp_path, models, monkeypatch):
    """A local Hub throttled to 300 kB/s each way (the tiny base takes ~1 s to download), with the recipe published."""
    yield from _throttled_hub(tmp_path, models, monkeypatch, 300_000)


@pytest.fixture
def slower_hub(tmp_path, models, monkeypatch):
    """The same at 60 kB/s: a base shard takes ~1 s, so a test can act while it is still arriving."""
    yield from _throttled_hub(tmp_path, models, monkeypatch, 60_000)


def _repo_files(server, repo: str) -> dict[str, str]:
    info = HfApi(endpoint=server.url, token=server.tokens["alice"]).model_info(repo, files_metadata=True)
    return {s.rfilename: s.lfs.sha256 if s.lfs else s.blob_id for s in info.siblings}


def _card(server, repo: str, cache: Path) -> str:
    path = hf_hub_download(repo, "README.md", endpoint=server.url, token=server.tokens["alice"], cache_dir=cache)
    return Path(path).read_text()


def _snapshot(cache: Path, repo: str) -> Path:
    return next((cache / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())


def _uploads(server) -> list[str]:
    """The LFS objects (oids) uploaded so far: the local Hub's log of upload PUTs."""
    return [
        r.path.split("?")[0].rsplit("/", 1)[-1]
        for r in server.requests
        if r.method == "PUT" and "/lfs-upload/" in r.path and r.status == 200
    ]


def _stream(server, tmp_path, repo: str, base: str = SHARDED, shard: str = OUT_SHARD, **kw):
    return merge(
        [LLAMA, ALPACA],
        base,
        push_to=repo,
        max_shard_size=shard,
        token=server.tokens["alice"],
        endpoint=server.url,
        cache_dir=tmp_path / "cache",
        progress=False,
        **kw,
    )


def test_streamed_push_publishes_the_files_a_non_streamed_run_writes(shared, tmp_path, monkeypatch):
    # the reference: merge into a folder, then `hubmerge push` it
    done = hubmerge(
        shared,
        tmp_path,
        LLAMA,
        ALPACA,
        "--base",
        SHARDED,
        "--out",
        tmp_path / "ref",
        "--max-shard-size",
        OUT_SHARD,
        "-q",
    )
    assert done.returncode == 0, done.stderr
    assert hubmerge(shared, tmp_path, "push", tmp_path / "ref", "alice/ref-merge").returncode == 0

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = _stream(shared, tmp_path, "alice/streamed-merge")
    ref, streamed = _repo_files(shared, "alice/ref-merge"), _repo_files(shared, "alice/streamed-merge")
    shards = [n for n in streamed if n.endswith(".safetensors")]
    assert len(shards) >= 4 and "model.safetensors.index.json" in streamed
    cards = [
        _card(shared, r, tmp_path / f"c-{r.replace('/', '-')}") for r in ("alice/ref-merge", "alice/streamed-merge")
    ]
    assert cards[0].replace("ref-merge", "X") == cards[1].replace("streamed-merge", "X")
    assert {n: d for n, d in ref.items() if n != "README.md"} == {n: d for n, d in streamed.items() if n != "README.md"}
    assert (
        result.push is not None
        and HfApi(endpoint=shared.url, token=shared.tokens["alice"]).model_info("alice/streamed-merge").private
    )
    # the recipe (byte-identical to the non-streamed run's, above) records the base shards' Hub SHA256
    recipe = json.loads(
        Path(
            hf_hub_download(
                "alice/streamed-merge",
                "hubmerge.json",
                endpoint=shared.url,
                token=shared.tokens["alice"],
                cache_dir=tmp_path / "c-recipe",
            )
        ).read_text()
    )
    assert recipe["base"]["files"] == {n: shared.file_entry(SHARDED, n).sha256 for n in SHARDS}
    # nothing of the output stays on disk; the downloads stay in the cache (the disk holds them)
    assert list(work.iterdir()) == []
    assert all((_snapshot(tmp_path / "cache", SHARDED) / n).is_file() for n in SHARDS)
    assert any("kept in the cache" in line for line in result.summary())


@pytest.mark.parametrize(
    ("hold", "short", "held"),
    [(0, False, False), (2**40, False, True), (2**40, True, False)],
    ids=["output-on-disk", "output-in-memory", "memory-short"],
)
def test_disk_holds_at_most_two_base_shards_and_the_output_in_flight(
    slow_hub, tmp_path, monkeypatch, hold, short, held
):
    # Output shards in flight within HOLD_BYTES are held in memory and never touch the disk; larger ones go to disk,
    # and so do those of a machine without the memory to spare.
    monkeypatch.setattr(streaming, "HOLD_BYTES", hold)
    if short:
        monkeypatch.setattr(streaming, "available_memory", lambda: 1)
    snapshot_dir = tmp_path / "cache" / f"models--{SHARDED.replace('/', '--')}"
    base_seen, out_seen, out_bytes, pools = [], [], [], set()
    work = tmp_path / "work"  # the job folder a Space passes: the shards in flight go there, not to the current one
    work.mkdir()
    monkeypatch.chdir(tmp_path)

    def count_base() -> int:
        return len(list(snapshot_dir.glob("snapshots/*/*.safetensors")))

    def count_out() -> int:  # output shards on disk: named ones, and removed ones still open (being uploaded)
        named = {p: p.stat().st_size for p in work.rglob("*.safetensors")}
        held = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith(str(work)) and target.endswith(".safetensors (deleted)"):
                    held[target] = os.stat(f"/proc/self/fd/{fd}").st_size
            except OSError:  # closed meanwhile
                pass
        out_bytes.append(sum(named.values()) + sum(held.values()))
        return len(named) + len(held)

    download = streaming.download_verified

    def download_and_count(*args, **kw):
        path = download(*args, **kw)
        base_seen.append(count_base())  # the shards on disk once this one landed
        return path

    call = streaming.ShardUploader.__call__

    def upload_and_count(self, path, digest):
        # a shard was just finished; the previous one may still be uploading
        on_disk = count_out()
        assert (self.held is not None) == held
        if held:
            assert on_disk == 0 and not path.exists()
            pools.add(self.held)
            out_seen.append(self.held.live)
            out_bytes.append(self.held.held)
        else:
            out_seen.append(on_disk)
        call(self, path, digest)

    from hubmerge import directio

    real_open, read_direct = os.open, set()

    def open_and_note(path, flags, *args, **kw):  # read past the page cache: shards this run downloaded and reads once
        if flags & os.O_DIRECT and not flags & (os.O_WRONLY | os.O_RDWR):
            read_direct.add(Path(path).name)
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(streaming, "download_verified", download_and_count)
    monkeypatch.setattr(streaming.ShardUploader, "__call__", upload_and_count)
    monkeypatch.setattr(directio.os, "open", open_and_note)
    limit = "30KB"  # below the largest tensors (the embeddings): each fills a shard alone
    result = _stream(slow_hub, tmp_path, "alice/bounded", shard=limit, keep_downloads=False, work_dir=work)
    assert read_direct == set(SHARDS)
    assert list(work.iterdir()) == [] and not list(tmp_path.glob("*.hubmerge-push"))
    assert len(base_seen) == 4 and max(base_seen) <= 2, base_seen
    # two on disk; held in memory, a backlog of more for the uploads
    shards = streaming.HELD_IN_FLIGHT if held else streaming.OUTPUT_IN_FLIGHT
    assert shards == (4 if held else 2)
    assert len(out_seen) >= 6 and max(out_seen) <= shards, out_seen
    assert max(out_seen) == shards, "the next shards should be written while the previous ones upload"
    # in bytes too: the embeddings, larger than a shard, are each uploaded before the next shard is written
    plan = result.plan
    largest = max(plan.out_dtype(t).itemsize * math.prod(t.shape) for t in plan.tensors)
    assert largest > parse_size(limit)
    assert max(out_bytes) <= streaming.output_in_flight(parse_size(limit), largest, shards), out_bytes
    assert all(p.live == 0 and p.held == 0 for p in pools) and len(pools) == held  # all memory given back
    summary = result.summary()
    assert any(("held in memory" in line) == held for line in summary if "output shards of up to" in line), summary
    assert count_base() == 0  # each removed once merged
    assert any("removed 4 base shards" in line for line in result.summary())
    assert set(_repo_files(slow_hub, "alice/bounded")) >= {"README.md", "hubmerge.json", "config.json"}


def test_held_output_shards_are_as_many_as_hold_bytes_and_the_spare_memory_allow():
    mb = 10**6
    limit, embeddings = 147 * mb, 205 * mb  # the 1b push: a sixteenth of the model; the embeddings fill one alone
    assert streaming.held_in_memory(limit, embeddings, keep_output=False) == streaming.HELD_IN_FLIGHT == 4
    assert streaming.held_in_memory(limit, embeddings, keep_output=True) == 0  # --out: the output is on disk anyway

    def memory(n: int) -> int:
        return HeldFiles.memory(streaming.output_in_flight(limit, embeddings, n), n)

    assert [streaming.held_in_memory(limit, embeddings, False, memory(n)) for n in (4, 3, 2)] == [4, 3, 2]
    assert streaming.held_in_memory(limit, embeddings, False, memory(4) - 1) == 3
    assert streaming.held_in_memory(limit, embeddings, False, memory(2) - 1) == 0  # on disk, two at most
    # the 7b push's default shards (861 MB) are too large to hold: on disk
    assert streaming.held_in_memory(861 * mb, 861 * mb, keep_output=False) == 0
    assert streaming.output_in_flight(861 * mb, 861 * mb) == 2 * 861 * mb


def test_a_bin_base_streams_shard_by_shard_into_the_files_a_local_merge_writes(shared, tmp_path, models, monkeypatch):
    # Bases of the LLaMA-1 era are often only torch .bin shards: each is planned from its zip directory and data.pkl
    # (read by range requests), downloaded once the merge needs it, and removed once merged, as safetensors ones are.
    repo, names = "alice/llama-tiny-bin", [f"pytorch_model-{k:05d}-of-00003.bin" for k in (1, 2, 3)]
    base = models.base(weights="bin", shards=3)
    assert sorted(p.name for p in base.glob("*.bin")) == names
    try:
        shared.create_repo(repo, private=True)
        shared.commit_files(repo, {p.name: p for p in sorted(base.iterdir()) if p.is_file()})
    except Exception:  # published by an earlier run of this test on the shared Hub
        pass
    ref = tmp_path / "ref"
    done = hubmerge(shared, tmp_path, LLAMA, ALPACA, "--base", base, "--out", ref, "--max-shard-size", OUT_SHARD)
    assert done.returncode == 0, done.stderr
    dry = hubmerge(shared, tmp_path, LLAMA, ALPACA, "--base", repo, "--push-to", "alice/bin-streamed", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "base shards downloaded ahead of the merge" in dry.stdout and "downloaded whole" not in dry.stdout

    snapshot_dir = tmp_path / "cache" / f"models--{repo.replace('/', '--')}"
    on_disk: list[int] = []
    download = streaming.download_verified

    def download_and_count(*args, **kw):
        path = download(*args, **kw)
        on_disk.append(len(list(snapshot_dir.glob("snapshots/*/*.bin"))))
        return path

    monkeypatch.setattr(streaming, "download_verified", download_and_count)
    monkeypatch.chdir(tmp_path)
    before = len(shared.requests)
    result = _stream(shared, tmp_path, "alice/bin-streamed", base=repo, keep_downloads=False)
    pushed = _repo_files(shared, "alice/bin-streamed")
    written = sorted(p.name for p in ref.iterdir() if p.name.startswith("model"))
    assert len(written) >= 5 and all(n in pushed for n in written)
    assert {n: pushed[n] for n in written if n.endswith(".safetensors")} == {
        n: hashlib.sha256((ref / n).read_bytes()).hexdigest() for n in written if n.endswith(".safetensors")
    }
    assert len(on_disk) == 3 and max(on_disk) <= 2, on_disk
    assert not list(snapshot_dir.glob("snapshots/*/*.bin")) and any(
        "removed 3 base shards" in x for x in result.summary()
    )
    # each .bin was read whole once (the download), after a few small ranged reads of its index
    gets = [r for r in shared.requests[before:] if r.method == "GET" and r.path.split("?")[0].endswith(".bin")]
    for name in names:
        mine = [r for r in gets if r.path.split("?")[0].endswith(name)]
        assert len([r for r in mine if r.range is None]) == 1, mine
        assert 1 <= len([r for r in mine if r.range]) <= 4, mine


def test_a_shard_unlike_the_index_it_was_planned_from_stops_the_push(shared, tmp_path, monkeypatch):
    # The plan comes from each shard's index read by ranges; the merge reads the downloaded file. A Hub that serves
    # the one and the other differently (verified SHA256 or not) must not get a merge of one planned from the other.
    read = streaming._read_weights

    def lying(path):
        refs = read(path)
        if path.name == SHARDS[1]:
            name, ref = next(iter(refs.items()))
            refs[name] = dataclasses.replace(ref, shape=(ref.shape[0] + 1, *ref.shape[1:]))
        return refs

    monkeypatch.setattr(streaming, "_read_weights", lying)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VerificationError, match=f"{SHARDS[1]}: its tensors differ from those of the index"):
        _stream(shared, tmp_path, "alice/planned-otherwise")
    assert not HfApi(endpoint=shared.url, token=shared.tokens["alice"]).repo_exists("alice/planned-otherwise")
    assert not list(tmp_path.glob("*.hubmerge-push"))


def test_a_bin_base_whose_index_is_damaged_is_refused_in_one_line_before_the_merge(shared, tmp_path, models):
    repo = "alice/llama-tiny-damaged-bin"
    base = models.base(weights="bin")
    files = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    weights = bytearray(files["pytorch_model.bin"])
    weights[-22:-18] = b"JUNK"  # the zip's end record: its directory cannot be found
    files["pytorch_model.bin"] = bytes(weights)
    try:
        shared.create_repo(repo, private=True)
        shared.commit_files(repo, files)
    except Exception:  # published by an earlier run of this test on the shared Hub
        pass
    done = hubmerge(shared, tmp_path, LLAMA, ALPACA, "--base", repo, "--push-to", "alice/from-damaged-bin")
    line = one_line_error(done)
    assert "pytorch_model.bin" in line and "not a complete torch zip file" in line, line
    assert not HfApi(endpoint=shared.url, token=shared.tokens["alice"]).repo_exists("alice/from-damaged-bin")
    # the CLI's head start may have fetched the file meanwhile (verified, a complete cache entry); nothing partial
    cached = tmp_path / "cache" / f"models--{repo.replace('/', '--')}"
    assert not list(cached.rglob("*.incomplete")) and not list(tmp_path.glob("*.hubmerge-push"))


def _cli(server, tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_TOKEN": server.tokens["alice"],
        "NO_PROXY": "127.0.0.1,localhost",
    }
    cmd = [sys.executable, "-m", "hubmerge.cli", LLAMA, ALPACA, "--base", SHARDED, *args]
    cmd += ["--max-shard-size", OUT_SHARD, "--cache-dir", str(tmp_path / "cache"), "-q"]
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_rerun_after_a_kill_resumes_without_uploading_again(slow_hub, tmp_path):
    repo = "alice/resumed"
    first = _cli(slow_hub, tmp_path, "--push-to", repo)
    deadline = time.monotonic() + 120
    while len(_uploads(slow_hub)) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    sent_before = set(_uploads(slow_hub))
    assert len(sent_before) >= 2
    assert slow_hub.resolve(repo) is None  # no commit: the repo never shows half a model

    slow_hub.clear_requests()
    second = _cli(slow_hub, tmp_path, "--push-to", repo)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    sent_again = set(_uploads(slow_hub))
    assert not sent_before & sent_again, "shards already on the Hub were uploaded again"
    files = _repo_files(slow_hub, repo)
    assert sent_before <= set(files.values()) and len([n for n in files if n.endswith(".safetensors")]) >= 6


def test_failure_before_the_commit_leaves_no_repo(shared, tmp_path):
    shared.faults.corrupt(SHARDED, SHARDS[2])  # always: verification fails twice, the run stops mid-stream
    done = _cli(shared, tmp_path, "--push-to", "alice/never-published", "--no-keep-downloads")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 1 and err.startswith("error: ") and SHARDS[2] in err, err
    assert len(err.strip().splitlines()) == 1
    assert not HfApi(endpoint=shared.url, token=shared.tokens["alice"]).repo_exists("alice/never-published")
    assert list((tmp_path / "work").iterdir()) == []  # nothing of the output left


def test_only_this_runs_downloads_are_removed(shared, tmp_path, models, monkeypatch):
    # a base with two commits: shard 1 cached at the old one (same content, so the same blob), shard 2 at the new one
    repo, cache = "alice/llama-tiny-two-commits", tmp_path / "cache"
    folder = models.base(shards=4)
    shared.create_repo(repo, private=True)
    old = shared.commit_files(repo, {p.name: p for p in sorted(folder.iterdir()) if p.is_file()})
    shared.commit_files(repo, {"NOTES.md": "a second commit\n"})
    before = {}
    for name, revision in ((SHARDS[0], old), (SHARDS[1], None)):
        path = hf_hub_download(
            repo, name, revision=revision, endpoint=shared.url, token=shared.tokens["alice"], cache_dir=cache
        )
        blob = Path(path).resolve()
        before[name] = (Path(path), blob, blob.stat().st_ino, blob.stat().st_mtime_ns)

    dry = hubmerge(
        shared, tmp_path, LLAMA, ALPACA, "--base", repo, "--push-to", "alice/x", "--no-keep-downloads", "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    assert "each removed from the cache once merged (--no-keep-downloads)" in dry.stdout
    assert "peak disk about" in dry.stdout

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = _stream(shared, tmp_path, "alice/cache-respected", base=repo, keep_downloads=False)
    assert any("removed 2 base shards" in line for line in result.summary())
    for name, (link, blob, ino, mtime) in before.items():  # untouched, link and content
        assert link.is_file() and blob.stat().st_ino == ino and blob.stat().st_mtime_ns == mtime, name
    head = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / shared.resolve(repo)
    for name in SHARDS[2:]:
        assert not (head / name).exists() and not (head / name).is_symlink()
    blobs = {p.name for p in (head.parents[1] / "blobs").iterdir()}
    assert {shared.file_entry(repo, n).sha256 for n in SHARDS[2:]}.isdisjoint(blobs)


def test_local_hub_bandwidth_is_shared_by_concurrent_transfers(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with LocalHub(tmp_path / "hub", bandwidth=2_000_000) as server:
        token = server.add_user("alice")
        server.create_repo("alice/blobs")
        server.commit_files("alice/blobs", {f"{k}.bin": os.urandom(1_000_000) for k in range(2)})
        started = time.monotonic()
        threads = [
            threading.Thread(
                target=hf_hub_download,
                args=("alice/blobs", f"{k}.bin"),
                kwargs=dict(endpoint=server.url, token=token, cache_dir=tmp_path / f"c{k}"),
            )
            for k in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    assert 0.9 <= elapsed <= 3.0, elapsed  # 2 MB through a shared 2 MB/s link: ~1 s, not ~0.5 s


def test_local_hub_link_lets_a_late_sender_use_its_buffer(monkeypatch):
    # a real link's buffer keeps it busy while the sender prepares its next chunk: a little lateness costs no rate
    from hubmerge.testing.localhub import throttle

    clock = [100.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(throttle.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    link = throttle.Link(1_000_000)  # 1 MB/s: 10 kB take 10 ms; BUFFER_S is 10 ms
    assert throttle.BUFFER_S == pytest.approx(0.010)
    link.take(10_000)  # an idle link's buffer takes it at once
    link.take(10_000)  # then the rate holds
    assert clock[0] == pytest.approx(100.010)
    clock[0] += 0.005  # the sender comes back 5 ms late: those 5 ms of link still count
    link.take(10_000)
    assert clock[0] == pytest.approx(100.020)
    clock[0] += 1.0  # idle for a second: gone, as on a real link (no burst of a second's worth)
    link.take(10_000)
    link.take(10_000)
    assert clock[0] == pytest.approx(101.030)


def test_push_into_a_repo_with_files_needs_overwrite_before_any_download(shared, tmp_path):
    api = HfApi(endpoint=shared.url, token=shared.tokens["alice"])
    api.create_repo("alice/occupied")
    api.upload_file(path_or_fileobj=b"x", path_in_repo="notes.txt", repo_id="alice/occupied")
    done = hubmerge(shared, tmp_path, LLAMA, ALPACA, "--base", SHARDED, "--push-to", "alice/occupied")
    assert "--overwrite" in one_line_error(done)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.safetensors"))
    assert api.repo_exists("alice/occupied")


def test_cli_push_without_out_leaves_neither_output_nor_downloads(shared, tmp_path):
    # the CLI starts the first shard's download while torch imports: it is still this run's download, removed too
    run = _cli(shared, tmp_path, "--push-to", "alice/cli-streamed", "--no-keep-downloads")
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert list((tmp_path / "work").iterdir()) == []
    base_cache = tmp_path / "cache" / f"models--{SHARDED.replace('/', '--')}"
    assert base_cache.is_dir() and not list(base_cache.rglob("*.safetensors")), "base shards left in the cache"
    assert not [p for p in (base_cache / "blobs").iterdir() if p.stat().st_size > 10_000]
    files = _repo_files(shared, "alice/cli-streamed")
    assert len([n for n in files if n.endswith(".safetensors")]) >= 6 and "hubmerge.json" in files


def test_head_start_lets_torch_import_once_the_first_shard_is_arriving(slower_hub, tmp_path, models, monkeypatch):
    # The CLI waits on this event before importing torch (both hold the GIL): it must come as the first shard's
    # bytes start to arrive, not when they have all arrived, and at once when there is nothing to download.
    from hubmerge import headstart
    from hubmerge.inputs.hub import hub_from_args

    hub = hub_from_args(slower_hub.tokens["alice"], tmp_path / "cache", slower_hub.url)
    landed: list[float] = []
    download = headstart.download_verified

    def download_and_note(*args, **kw):
        path = download(*args, **kw)
        landed.append(time.monotonic())
        return path

    monkeypatch.setattr(headstart, "download_verified", download_and_note)
    begun = headstart.head_start(SHARDED, hub, "alice/head-start", overwrite=False).begun
    assert begun.wait(30)
    at = time.monotonic()
    deadline = time.monotonic() + 30
    while not landed and time.monotonic() < deadline:  # 66 kB at 60 kB/s: ~1 s after the first bytes
        time.sleep(0.01)
    assert landed and at < landed[0], "set only after the first shard had fully arrived"
    assert (_snapshot(tmp_path / "cache", SHARDED) / SHARDS[0]).is_file()

    local = headstart.head_start(str(models.base()), hub, "alice/head-start", overwrite=False)
    assert local.begun.wait(5), "nothing to download: the import should not wait"


def test_a_run_that_fails_first_cancels_the_head_start_leaving_nothing_half_written(slower_hub, tmp_path, monkeypatch):
    # A push that fails early (a bad adapter, say) exits while the head start is still downloading: at exit it is
    # cancelled, and its partial file goes, instead of staying in the cache under a name no run will resume.
    from hubmerge import directio, headstart
    from hubmerge.inputs.hub import hub_from_args

    monkeypatch.setattr(directio, "STAGE_BYTES", 16 * 1024)  # progress reports (where a cancel is noticed) every 16 kB
    hub = hub_from_args(slower_hub.tokens["alice"], tmp_path / "cache", slower_hub.url)
    started = headstart.head_start(SHARDED, hub, "alice/head-start-cancelled", overwrite=False)
    assert started.begun.wait(30)
    started.cancel()  # what the exit does
    blobs = tmp_path / "cache" / f"models--{SHARDED.replace('/', '--')}" / "blobs"
    assert not [p.name for p in blobs.iterdir() if p.stat().st_size > 10_000 or p.name.endswith(".incomplete")]
