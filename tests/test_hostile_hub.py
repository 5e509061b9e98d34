"""A hostile Hub endpoint (HF_ENDPOINT pointing at a mirror that lies): every answer it can forge, driven through the
``hubmerge`` command and the real huggingface_hub client against a proxy in front of the local Hub.

Each run must end with one line naming the endpoint; no file may appear outside the download cache (the proxy aims
at a user site-packages folder, where a ``.pth`` file would run code at the next Python start); the token may reach
the endpoint only; and the run must stop within a time bound whatever the server does."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import BASE_REPO as BASE
from support import LLAMA_REPO as LLAMA

from hubmerge.testing.localhub.hostile import Exchange, HostileProxy

TRUST = "refusing; is HF_ENDPOINT a trusted mirror?"
BOUND_SECONDS = 40  # a generous bound for one refused run on a busy 2-core machine (they take a few seconds)


def _socket_buffers() -> int:
    """The most bytes the kernel may still take from an endless sender after the client stops reading, until it
    closes the connection: the receiver's and the sender's largest TCP buffers (32 + 4 MiB on this VM)."""
    total = 0
    for side in ("tcp_rmem", "tcp_wmem"):
        try:
            total += int(Path(f"/proc/sys/net/ipv4/{side}").read_text().split()[2])
        except (OSError, IndexError, ValueError):
            total += 8 * 2**20
    return total


class Scene:
    """One hostile run's world: the proxy, a foreign host, a user site-packages folder the attack aims at."""

    def __init__(self, tmp_path: Path, proxy: HostileProxy, foreign: HostileProxy, token: str):
        self.tmp, self.proxy, self.foreign, self.token = tmp_path, proxy, foreign, token
        self.userbase = tmp_path / "userbase"
        self.site = self.userbase / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
        self.site.mkdir(parents=True)
        self.marker = tmp_path / "ran"
        self.pth = self.site / "evil.pth"
        self.pth_code = f"import os; open({str(self.marker)!r}, 'w').close()"
        self.cache = tmp_path / "cache"

    def env(self, **extra: str | None) -> dict[str, str]:
        """The run's environment; ``extra`` values of None remove a variable."""
        env = {
            **os.environ,
            "HF_ENDPOINT": self.proxy.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(self.tmp / "hf-home"),
            "HOME": str(self.tmp / "home"),
            "PYTHONUSERBASE": str(self.userbase),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "HF_TOKEN": self.token,
            "HUBMERGE_HUB_RETRIES": "1",
            "HF_HUB_ETAG_TIMEOUT": "2",
            "HF_HUB_DOWNLOAD_TIMEOUT": "2",
        }
        env.update(extra)
        return {k: v for k, v in env.items() if v is not None}

    def run(self, *args: object, timeout: float = 120, **env: str | None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "hubmerge.cli", *map(str, args)]
        if args[0] != "push":
            cmd += ["--cache-dir", str(self.cache)]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env(**env), timeout=timeout)

    def traversal(self, name: str = "evil.pth") -> str:
        """A relative path from inside the adapter's cache folder (blobs/, refs/) to the site folder."""
        blobs = self.cache / f"models--{LLAMA.replace('/', '--')}" / "blobs"
        return os.path.relpath(self.site / name, blobs)

    def files_outside_cache(self) -> list[Path]:
        skip = (self.cache, self.tmp / "hf-home", self.tmp / "home")
        return [
            p
            for p in self.tmp.rglob("*")
            if (p.is_file() or p.is_symlink()) and not any(p.is_relative_to(s) for s in skip)
        ]

    def assert_nothing_lost_or_run(self, before: list[Path]) -> None:
        assert sorted(self.files_outside_cache()) == sorted(before)
        assert not any(self.site.iterdir()), list(self.site.iterdir())
        started = subprocess.run([sys.executable, "-c", "pass"], env=self.env(), timeout=60)
        assert started.returncode == 0 and not self.marker.exists()  # no .pth ran at the next Python start
        # the token went to the endpoint only
        assert all(s.authorization is None for s in self.foreign.seen), self.foreign.seen


@pytest.fixture
def scene(hub, tmp_path):
    with HostileProxy(hub.url) as proxy, HostileProxy(None) as foreign:
        yield Scene(tmp_path, proxy, foreign, hub.tokens["alice"])


def _resolve(x: Exchange, name: str | None = None) -> bool:
    return "/resolve/" in x.path and (name is None or x.path.split("?")[0].endswith("/" + name))


def _info(x: Exchange) -> bool:
    return x.path.startswith(f"/api/models/{LLAMA}") and x.status == 200 and "/tree/" not in x.path


def _edit_info(x: Exchange, change: Callable[[dict], None]) -> None:
    if _info(x):
        data = json.loads(x.body)
        change(data)
        x.body = json.dumps(data).encode()


def _sibling(data: dict, name: str) -> dict:
    return next(s for s in data["siblings"] if s["rfilename"] == name)


WEIGHTS = "adapter_model.bin"


def _case_info_sha_absolute(s: Scene, x: Exchange) -> None:
    _edit_info(x, lambda d: d.update(sha=str(s.pth)))
    if _resolve(x):
        x.set("X-Repo-Commit", s.pth_code)


def _case_info_sha_dotdot(s: Scene, x: Exchange) -> None:
    _edit_info(x, lambda d: d.update(sha=s.traversal()))


def _case_commit_header(s: Scene, x: Exchange) -> None:
    if _resolve(x):
        x.set("X-Repo-Commit", s.traversal())


def _case_etag(s: Scene, x: Exchange) -> None:
    if _resolve(x, WEIGHTS):
        x.set("ETag", f'"{s.traversal()}"')
        x.set("X-Linked-Etag", f'"{s.traversal()}"')
        if x.method == "GET":
            x.body = s.pth_code.encode()


def _case_404_commit(s: Scene, x: Exchange) -> None:
    if _resolve(x, "adapter_config.json"):
        x.status, x.body = 404, b'{"error": "Entry not found"}'
        x.set("X-Error-Code", "EntryNotFound")
        x.set("X-Repo-Commit", str(s.site))


def _case_endless(s: Scene, x: Exchange) -> None:
    if _resolve(x, WEIGHTS) and x.method == "GET":
        x.endless = True


def _case_endless_api(s: Scene, x: Exchange) -> None:
    if _info(x):
        x.endless = True


def _case_size(s: Scene, x: Exchange) -> None:
    if _resolve(x, WEIGHTS) and x.method == "HEAD":
        size = int(x.get("X-Linked-Size") or x.get("Content-Length") or 0) + 1000
        x.set("X-Linked-Size", str(size))
        x.declared = size


def _case_redirect(s: Scene, x: Exchange) -> None:
    if _resolve(x, WEIGHTS):
        x.status, x.body = 302, b""
        x.set("Location", f"{s.foreign.url}/lfs/{WEIGHTS}")
        x.declared = 0


def _case_location_on_200(s: Scene, x: Exchange) -> None:
    if _resolve(x, WEIGHTS) and x.method == "HEAD":
        x.set("Location", f"{s.foreign.url}/lfs/{WEIGHTS}")


def _case_gzip(s: Scene, x: Exchange) -> None:
    if _resolve(x, WEIGHTS) and x.method == "GET":
        x.body = gzip.compress(x.body)
        x.set("Content-Encoding", "gzip")


def _case_other_commit(s: Scene, x: Exchange) -> None:
    if _resolve(x, WEIGHTS):
        x.set("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")


def _case_etag_differs(s: Scene, x: Exchange) -> None:
    if _resolve(x, WEIGHTS):
        x.set("X-Linked-Etag", '"' + "ab" * 32 + '"')


def _case_listing_lfs(s: Scene, x: Exchange) -> None:
    _edit_info(x, lambda d: _sibling(d, WEIGHTS)["lfs"].update(sha256=s.traversal()))


def _case_listing_size(s: Scene, x: Exchange) -> None:
    _edit_info(x, lambda d: _sibling(d, "adapter_config.json").update(size=-5))


def _case_listing_blob(s: Scene, x: Exchange) -> None:
    _edit_info(x, lambda d: _sibling(d, "adapter_config.json").update(blobId=s.traversal()))


HOSTILE = [
    ("model-info-sha-absolute", _case_info_sha_absolute, "invalid commit id"),
    ("model-info-sha-dotdot", _case_info_sha_dotdot, "invalid commit id"),
    ("x-repo-commit-dotdot", _case_commit_header, "invalid commit id"),
    ("etag-dotdot-serving-pth", _case_etag, "invalid ETag"),
    ("404-with-bad-x-repo-commit", _case_404_commit, "invalid commit id"),
    ("endless-download", _case_endless, "more bytes than it declared"),
    ("endless-api-answer", _case_endless_api, "more bytes than it declared"),
    ("size-differs-from-listing", _case_size, "file size of"),
    ("redirect-to-foreign-host", _case_redirect, "redirect to another host"),
    ("location-header-on-200", _case_location_on_200, "redirect to another host"),
    ("compressed-body", _case_gzip, "compressed body"),
    ("commit-differs-from-pinned", _case_other_commit, "pinned to commit"),
    ("etag-differs-from-listing", _case_etag_differs, "differs from its listing"),
    ("listing-lfs-sha256", _case_listing_lfs, "invalid LFS record"),
    ("listing-negative-size", _case_listing_size, "invalid size"),
    ("listing-blob-id", _case_listing_blob, "invalid blob id"),
]


@pytest.mark.parametrize("case,rewrite,fragment", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_answer_is_refused_with_one_line_and_nothing_lands_outside_the_cache(
    scene, hub, case, rewrite, fragment
):
    before = scene.files_outside_cache()
    scene.proxy.rewrite = lambda x: rewrite(scene, x)
    started = time.monotonic()
    done = scene.run(LLAMA, "--base", hub.local["base"], "--out", scene.tmp / "out")
    elapsed = time.monotonic() - started
    line = _one_line(done)
    assert fragment in line and TRUST in line and scene.proxy.url.split("//")[1] in line, line
    assert elapsed < BOUND_SECONDS, elapsed
    assert not (scene.tmp / "out").exists()
    scene.assert_nothing_lost_or_run(before)
    if case.startswith("endless"):  # the client stopped at the declared size, or at 64 MiB for an API answer
        assert scene.proxy.endless_bytes < 80 * 2**20 + _socket_buffers()
    if case == "endless-download":
        declared = hub.file_entry(LLAMA, WEIGHTS).size
        assert all(p.stat().st_size <= declared for p in scene.cache.rglob("*") if p.is_file())


def _one_line(done: subprocess.CompletedProcess, allow_retries: bool = False) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr, done.stderr
    if allow_retries:
        assert all(ln.startswith("retrying: ") for ln in lines[:-1]), lines
    else:
        assert len(lines) == 1, lines
    assert lines[-1].startswith("error: "), lines
    return lines[-1]


def test_lfs_batch_naming_another_host_never_gets_the_token(scene, hub, tmp_path):
    from hubmerge import merge

    merge([hub.local[LLAMA]], hub.local["base"], tmp_path / "out", progress=False)
    before = scene.files_outside_cache()

    def verify_elsewhere(x: Exchange) -> None:
        if x.path.endswith("/info/lfs/objects/batch") and x.status == 200:
            data = json.loads(x.body)
            for obj in data["objects"]:
                if "verify" in obj.get("actions", {}):
                    obj["actions"]["verify"]["href"] = f"{scene.foreign.url}/verify?oid={obj['oid']}"
            x.body = json.dumps(data).encode()

    scene.proxy.rewrite = verify_elsewhere
    done = scene.run("push", tmp_path / "out", "alice/pushed-through-mirror")
    assert done.returncode == 0, done.stderr
    assert [s.path for s in scene.foreign.seen if s.path.startswith("/verify")], "the verify step never ran"
    assert all(s.authorization is None for s in scene.foreign.seen)
    assert any(s.authorization for s in scene.proxy.seen)  # the endpoint itself did get the token
    assert scene.token not in done.stdout + done.stderr
    scene.assert_nothing_lost_or_run(before)


def test_server_that_never_answers_a_download_fails_with_one_line_after_saying_it_retries(scene, hub):
    scene.proxy.hang = lambda x: _resolve(x, WEIGHTS)
    started = time.monotonic()
    done = scene.run(LLAMA, "--base", hub.local["base"], "--out", scene.tmp / "out")
    elapsed = time.monotonic() - started
    line = _one_line(done, allow_retries=True)
    assert "did not answer" in line and scene.proxy.url.split("//")[1] in line, line
    assert "retrying: " in done.stderr  # each retry said so, on its line
    assert elapsed < BOUND_SECONDS, elapsed


def test_endpoint_that_accepts_connections_and_never_answers_fails_within_a_minute(tmp_path, hub):
    with HostileProxy(None) as silent, HostileProxy(None) as foreign:
        silent.hang = lambda x: True
        scene = Scene(tmp_path, silent, foreign, hub.tokens["alice"])
        started = time.monotonic()
        # the client's default timeouts (10 s), as a user has them
        env = {"HF_HUB_ETAG_TIMEOUT": None, "HF_HUB_DOWNLOAD_TIMEOUT": None, "HUBMERGE_HUB_RETRIES": None}
        done = scene.run(LLAMA, "--base", hub.local["base"], "--out", tmp_path / "out", **env)
        elapsed = time.monotonic() - started
    line = _one_line(done, allow_retries=True)
    assert silent.url.split("//")[1] in line, line
    assert elapsed < 60, elapsed


def test_failed_verification_never_deletes_a_file_outside_the_cache(scene, hub):
    # A cache entry left pointing outside the cache (by an older client, or by hand): it fails verification, and
    # the clean-up removes the link only, never the file it resolves to.
    thesis = scene.tmp / "documents" / "thesis.txt"
    thesis.parent.mkdir()
    thesis.write_text("years of work\n")
    snapshot = scene.cache / f"models--{LLAMA.replace('/', '--')}" / "snapshots" / hub.resolve(LLAMA)
    snapshot.mkdir(parents=True)
    (snapshot / "adapter_config.json").symlink_to(thesis)
    done = scene.run(LLAMA, "--base", hub.local["base"], "--out", scene.tmp / "out", "-q")
    assert done.returncode == 0, done.stderr  # downloaded again, verified, merged
    assert thesis.read_text() == "years of work\n"
    assert not (snapshot / "adapter_config.json").resolve().is_relative_to(thesis.parent)


# The streamed push downloads its Hub base with its own downloader (hubmerge/inputs/download.py): the same answers.
STREAM_WEIGHTS = "model.safetensors"


def _stream(scene: Scene, repo: str, base: str = BASE) -> subprocess.CompletedProcess:
    return scene.run(LLAMA, "--base", base, "--push-to", repo, "--out", scene.tmp / "out", "-q")


def test_streamed_base_with_an_endless_body_stops_at_its_size_in_one_line(scene, hub):
    from huggingface_hub import HfApi

    before = scene.files_outside_cache()
    scene.proxy.rewrite = lambda x: setattr(x, "endless", True) if _stream_get(x) else None
    done = _stream(scene, "alice/endless-base")
    line = _one_line(done)
    assert "more bytes than it declared" in line and TRUST in line, line
    assert scene.proxy.endless_bytes < 80 * 2**20
    declared = hub.file_entry(BASE, STREAM_WEIGHTS).size
    assert all(p.stat().st_size <= declared for p in scene.cache.rglob("*") if p.is_file())
    assert not HfApi(endpoint=hub.url, token=scene.token).repo_exists("alice/endless-base")  # created, then removed
    scene.assert_nothing_lost_or_run(before)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_streamed_base_cut_then_resumed_from_a_server_that_ignores_range(scene, hub, models, tmp_path, weights):
    # Every answer from the start stops halfway (its Content-Length promises the rest); every ranged request, the
    # resume and the index reads (a safetensors header, a .bin's zip directory at the file's end), gets the whole
    # file with 200, as from a server that ignores Range: the bytes before the asked offset must be dropped, and the
    # result is the same file.
    base, folder, name = BASE, hub.local["base"], STREAM_WEIGHTS
    if weights == "bin":
        base, folder, name = "alice/llama-tiny-bin-hostile", models.base(weights="bin"), "pytorch_model.bin"
        try:
            hub.create_repo(base, private=True)
            hub.commit_files(base, {p.name: p for p in sorted(folder.iterdir()) if p.is_file()})
        except Exception:  # already published on the session's Hub
            pass
    whole = (folder / name).read_bytes()
    cut = []

    def ignore_range(x: Exchange) -> None:
        if not _stream_get(x, base, name):
            return
        if any(k.lower() == "range" for k in x.request_headers):
            x.status, x.body = 200, whole
            x.set("Content-Range", None)
        else:  # every download from the start is cut: only resuming at the right offset completes the file
            cut.append(True)
            x.body, x.declared = whole[: len(whole) // 2], len(whole)

    scene.proxy.rewrite = ignore_range
    done = _stream(scene, f"alice/range-ignored-{weights}", base)
    assert done.returncode == 0, done.stderr
    assert cut, "the download was never cut"
    from hubmerge import merge

    reference = merge([hub.local[LLAMA]], folder, tmp_path / "reference", progress=False)
    for out in ("model.safetensors", "model.safetensors.index.json"):
        ours, theirs = scene.tmp / "out" / out, reference.out / out
        assert ours.exists() == theirs.exists()
        if ours.exists():
            assert ours.read_bytes() == theirs.read_bytes()


def _stream_get(x: Exchange, base: str = BASE, name: str = STREAM_WEIGHTS) -> bool:
    return (
        x.method == "GET"
        and "/resolve/" in x.path
        and x.path.split("?")[0].endswith(f"/{name}")
        and (f"/{base}/" in x.path)
    )
