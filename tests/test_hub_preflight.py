"""What hubmerge finds out before it downloads, and what it does when the network or the disk gives out: the push
target preflight, offline runs from the cache, download sizes of a sharded base, a disk that fills during a
download. The ``hubmerge`` command runs in its own process against the local Hub, through the real client."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
from support import ALPACA_REPO as ALPACA
from support import BASE_REPO as BASE
from support import LLAMA_REPO as LLAMA
from support import hubmerge, one_line_error

from hubmerge import Hub, HubAccessError, check_push_target, push
from hubmerge.sizes import format_size


def cli(hub, tmp_path, *args, token="alice", cache="cache", preexec=None, **env):
    """The CLI as a user runs it (own HF home, HF_TOKEN, a cache folder but for push); ``env`` adds variables."""
    cache = None if args[0] == "push" else cache
    return hubmerge(hub, tmp_path, *args, token=token, cache=cache, env=env, preexec_fn=preexec)


def downloaded(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ----------------------------------------------------------------------------------------------- push preflight
@pytest.mark.parametrize(
    "case,repo,token,fragments",
    [
        ("foreign-namespace", "hfl/not-mine", "alice", ("may not write to hfl", "alice")),
        ("read-token", "alice/new-model", "alice-read", ("may not write (role 'read')",)),
        ("no-token", "alice/new-model", None, ("needs a token", "hf auth login")),
        ("exists-with-files", "alice/has-files", "alice", ("already has 1 file;", "--overwrite")),
    ],
)
def test_push_target_refused_before_any_download(hub, tmp_path, case, repo, token, fragments):
    if case == "exists-with-files":
        api = HfApi(endpoint=hub.url, token=hub.tokens["alice"])
        api.create_repo(repo, private=True, exist_ok=True)
        api.upload_file(path_or_fileobj=b"old", path_in_repo="old.txt", repo_id=repo)
    line = one_line_error(
        cli(hub, tmp_path, LLAMA, "--base", BASE, "--out", tmp_path / "out", "--push-to", repo, token=token)
    )
    for fragment in fragments:
        assert fragment in line, line
    assert downloaded(tmp_path / "cache") == []  # refused before a single file was fetched
    assert not (tmp_path / "out").exists()
    dry = one_line_error(cli(hub, tmp_path, LLAMA, "--base", BASE, "--dry-run", "--push-to", repo, token=token))
    assert dry == line


def test_dry_run_shows_the_push_target_and_what_happens_to_it(hub, tmp_path):
    dora = hub.add_user("dora", orgs=["team"])
    api = HfApi(endpoint=hub.url, token=dora)
    api.create_repo("dora/empty", private=False)
    api.create_repo("team/full", private=True)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id="team/full")
    cases = [
        ("team/new", (), "push: team/new: will be created (private)"),
        ("dora/new", ("--public",), "push: dora/new: will be created (public)"),
        ("dora/empty", (), "push: dora/empty: exists (public) and is empty"),
        ("team/full", ("--overwrite",), "push: team/full: exists (private) with 1 file; --overwrite replaces them"),
    ]
    for repo, flags, want in cases:
        done = cli(
            hub, tmp_path, LLAMA, "--base", hub.local["base"], "--dry-run", "--push-to", repo, *flags, token=dora
        )
        assert done.returncode == 0, done.stderr
        assert want in done.stdout.splitlines()[-1], done.stdout
    with pytest.raises(RepositoryNotFoundError):  # the dry run created nothing
        api.model_info("team/new")


def test_check_push_target_result_for_the_space(hub):
    target = check_push_target("alice/for-space", Hub(endpoint=hub.url, token=hub.tokens["alice"]))
    assert (target.repo_id, target.exists, target.files, target.will_create, target.private, target.can_write) == (
        "alice/for-space",
        False,
        0,
        True,
        True,
        True,
    )
    refused = check_push_target("hfl/x", Hub(endpoint=hub.url, token=hub.tokens["bob"]))
    assert not refused.can_write and "may not write to hfl" in refused.message
    with pytest.raises(HubAccessError):
        refused.require()


def test_failed_push_deletes_only_the_repo_it_created(hub, tmp_path):
    from hubmerge import merge

    out = merge([hub.local[LLAMA]], hub.local["base"], tmp_path / "out", progress=False).out
    alice = Hub(endpoint=hub.url, token=hub.tokens["alice"])
    api = alice.api()
    api.create_repo("alice/kept-empty", private=True)
    for repo in ("alice/created-then-failed", "alice/kept-empty"):
        fault = hub.faults.fail_status(rf"^/api/models/{repo}/commit/", 422, times=None)
        with pytest.raises(HubAccessError):
            push(out, repo, hub=alice)
        assert hub.faults.get(fault)["hits"] >= 1
        hub.faults.remove(fault)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/created-then-failed")
    assert api.model_info("alice/kept-empty").id == "alice/kept-empty"  # there before: left alone


# -------------------------------------------------------------------------------------------------------- offline
def test_offline_run_from_the_cache_gives_the_same_result(hub, tmp_path):
    online = cli(hub, tmp_path, LLAMA, ALPACA, "--base", BASE, "--out", tmp_path / "online", "-q")
    assert online.returncode == 0, online.stderr
    # offline, with a dead endpoint to be sure nothing is asked of the network; @main resolved through refs/
    dead = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    offline = cli(hub, tmp_path, f"{LLAMA}@main", ALPACA, "--base", BASE, "--out", tmp_path / "offline", "-q", **dead)
    assert offline.returncode == 0, offline.stderr
    first, second = (json.loads((tmp_path / d / "hubmerge.json").read_text()) for d in ("online", "offline"))
    assert first["files"] == second["files"]  # the same output, byte for byte
    for a, b in zip([first["base"], *first["adapters"]], [second["base"], *second["adapters"]]):
        assert (a["commit"], a["files"]) == (b["commit"], b["files"])
    line = one_line_error(
        cli(hub, tmp_path, LLAMA, "--base", BASE, "--out", tmp_path / "x", cache="empty-cache", **dead)
    )
    assert "HF_HUB_OFFLINE=1" in line and BASE in line and "unset HF_HUB_OFFLINE" in line


# ---------------------------------------------------------------------------------------------- dry-run sizes
def test_dry_run_reports_the_shards_of_a_sharded_base_on_an_empty_cache(hub, tmp_path, models):
    repo = "alice/sharded-base"
    api = HfApi(endpoint=hub.url, token=hub.tokens["alice"])
    if not api.repo_exists(repo):
        api.create_repo(repo, private=True)
        api.upload_folder(repo_id=repo, folder_path=models.base(shards=3))
    shards = [s for s in api.model_info(repo, files_metadata=True).siblings if s.rfilename.startswith("model-0")]
    assert len(shards) == 3
    done = cli(hub, tmp_path, LLAMA, "--base", repo, "--dry-run")
    assert done.returncode == 0, done.stderr
    base_line = next(ln for ln in done.stdout.splitlines() if ln.startswith("base: "))
    assert f"{format_size(sum(s.size for s in shards))} to download (" in base_line, base_line
    assert "(3 cached)" not in base_line and "0 B to download" not in base_line


# --------------------------------------------------------------------------------------------------- full disk
def _file_size_limit(nbytes: int):
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return limit


def test_download_that_runs_out_of_room_says_it_is_the_disk(hub, tmp_path):
    size = hub.file_entry(BASE, "model.safetensors").size
    done = cli(hub, tmp_path, LLAMA, "--base", BASE, "--out", tmp_path / "out", preexec=_file_size_limit(size // 2))
    line = one_line_error(done)
    assert "file size limit" in line and f"{BASE}/model.safetensors" in line, line
    assert f"{format_size(size)} needed" in line and "free" in line and "cannot reach" not in line


def test_download_onto_a_full_disk_says_it_is_the_disk(hub, tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        args = (LLAMA, "--base", BASE, "--out", tmp_path / "out")
        # too small for what the listing says is to download: refused before downloading, with the numbers
        line = one_line_error(cli(hub, tmp_path, *args, cache="small-disk/cache"))
        assert "free but the downloads need" in line, line
        # big enough by the listing, but files take whole pages on disk: it fills up during the last download
        subprocess.run(["mount", "-o", "remount,size=412k", str(disk)], check=True)
        line = one_line_error(cli(hub, tmp_path, *args, cache="small-disk/cache"))
        assert "the disk filled up" in line and f"{BASE}/model.safetensors" in line and "free" in line, line
    finally:
        subprocess.run(["umount", str(disk)], check=True)
