"""Tests of the local Hub server (hubmerge/testing/localhub) through the real huggingface_hub client.

Every check goes through ``HfApi``/``hf_hub_download``/``snapshot_download`` pointed at the server, except a few raw
HTTP requests (urllib) for what the client cannot express: Range requests, a tampered LFS upload, control endpoints.
"""

import os

# Before huggingface_hub is imported (conftest does the same; repeated so this module also runs on its own).
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import base64  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hubmerge.testing.localhub import LocalHub  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


@pytest.fixture(autouse=True)
def _client_online_without_xet(monkeypatch):
    # The client may have been imported before our env vars (e.g. by another conftest section): force them.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def git_sha1(data: bytes) -> str:
    """Independent git blob id, to check the server's ``blobId``."""
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def http(method, url, *, token=None, body=None, headers=None):
    """Raw request; returns ``(status, headers, body)`` also for error statuses."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(req, timeout=20) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@dataclass
class Users:
    alice: str  # write token; member of org "hfl"
    alice_read: str  # read-only token of alice
    bob: str  # write token, no org
    carol: str  # write token, member of "hfl"


@pytest.fixture
def users(localhub) -> Users:
    return Users(
        alice=localhub.add_user("alice", orgs=["hfl"]),
        alice_read=localhub.add_token("alice", "read"),
        bob=localhub.add_user("bob"),
        carol=localhub.add_user("carol", orgs=["hfl"]),
    )


README = b"""---
license: apache-2.0
tags:
- llama
- lora
base_model: huggyllama/llama-7b
---
# Test model
"""


def make_folder(tmp_path: Path) -> dict[str, bytes]:
    """A small model folder: README with front matter, a text config, an LFS weights file in a sub-folder."""
    files = {
        "README.md": README,
        "config.json": b'{"hidden_size": 8}\n',
        "weights/model.safetensors": os.urandom(300_000),
    }
    for rel, data in files.items():
        p = tmp_path / "folder" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def publish(
    hub: LocalHub, token: str, tmp_path: Path, repo_id: str = "alice/m", **create_kw
) -> tuple[HfApi, dict[str, bytes], str]:
    api = HfApi(endpoint=hub.url, token=token)
    api.create_repo(repo_id, **create_kw)
    files = make_folder(tmp_path)
    commit = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "folder", commit_message="first")
    return api, files, commit.oid


def download(hub, repo_id, filename, token, cache, **kw) -> bytes:
    return Path(hf_hub_download(repo_id, filename, endpoint=hub.url, token=token, cache_dir=cache, **kw)).read_bytes()


# --------------------------------------------------------------------------------------------------------------------
def test_whoami_reports_user_orgs_role_and_rejects_unknown_tokens(localhub, users):
    api = HfApi(endpoint=localhub.url)
    me = api.whoami(token=users.alice)
    assert me["name"] == "alice"
    assert [o["name"] for o in me["orgs"]] == ["hfl"]
    assert me["auth"]["accessToken"]["role"] == "write"
    assert api.whoami(token=users.alice_read)["auth"]["accessToken"]["role"] == "read"
    assert api.whoami(token=users.bob)["orgs"] == []

    with pytest.raises(HfHubHTTPError) as e:
        api.whoami(token="hf_notatokenthisserverknows")
    assert e.value.response.status_code == 401
    # Unknown tokens are refused everywhere, public resources included, and not mistaken for a missing repo.
    HfApi(endpoint=localhub.url, token=users.alice).create_repo("alice/pub")
    with pytest.raises(HfHubHTTPError) as e:
        api.model_info("alice/pub", token="hf_notatokenthisserverknows")
    assert e.value.response.status_code == 401
    assert not isinstance(e.value, RepositoryNotFoundError)
    status, _, _ = http("GET", f"{localhub.url}/api/whoami-v2")
    assert status == 401


def test_create_repo_visibility_conflicts_namespaces_and_delete(localhub, users):
    api = HfApi(endpoint=localhub.url, token=users.alice)
    url = api.create_repo("alice/pub")
    assert url == f"{localhub.url}/alice/pub" and url.repo_id == "alice/pub"
    api.create_repo("alice/priv", private=True)
    assert api.model_info("alice/priv").private is True
    assert api.model_info("alice/pub").private is False

    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("alice/pub")
    assert e.value.response.status_code == 409
    assert api.create_repo("alice/pub", exist_ok=True).repo_id == "alice/pub"

    # Namespaces: own org yes, someone else's no.
    assert api.create_repo("hfl/shared").repo_id == "hfl/shared"
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=localhub.url, token=users.bob).create_repo("alice/intruder")
    assert e.value.response.status_code == 403
    assert not api.repo_exists("alice/intruder")

    # An empty repo has no commit yet, but model_info works.
    empty = api.model_info("alice/pub")
    assert empty.sha is None and empty.siblings == []

    # Other repo types.
    api.create_repo("alice/ds", repo_type="dataset")
    assert api.dataset_info("alice/ds").id == "alice/ds"
    assert not api.repo_exists("alice/ds")  # a dataset is not a model
    api.create_repo("alice/space", repo_type="space", space_sdk="gradio")
    assert api.space_info("alice/space").sdk == "gradio"

    api.delete_repo("alice/pub")
    assert not api.repo_exists("alice/pub")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("alice/pub")
    api.delete_repo("alice/pub", missing_ok=True)


def test_upload_folder_metadata_matches_content_and_downloads_are_byte_identical(localhub, users, tmp_path):
    api, files, commit_id = publish(localhub, users.alice, tmp_path)
    info = api.model_info("alice/m", files_metadata=True)
    assert info.sha == commit_id
    sib = {s.rfilename: s for s in info.siblings}
    assert set(sib) == set(files)

    weights = files["weights/model.safetensors"]
    w = sib["weights/model.safetensors"]
    assert w.lfs is not None and w.lfs.sha256 == sha256(weights) and w.lfs.size == len(weights) == w.size
    for name in ("README.md", "config.json"):  # regular files: git blob sha1 of the content, no LFS record
        assert sib[name].lfs is None
        assert sib[name].blob_id == git_sha1(files[name])
        assert sib[name].size == len(files[name])
    assert localhub.file_entry("alice/m", "weights/model.safetensors").lfs is True

    # README front matter comes back as cardData.
    assert info.card_data["license"] == "apache-2.0"
    assert info.card_data["tags"] == ["llama", "lora"]
    assert info.card_data["base_model"] == "huggyllama/llama-7b"

    # HEAD metadata: ETag is sha256 for LFS, git sha1 otherwise; the commit is pinned.
    meta = get_hf_file_metadata(
        hf_hub_url("alice/m", "weights/model.safetensors", endpoint=localhub.url), token=users.alice
    )
    assert (meta.etag, meta.size, meta.commit_hash) == (sha256(weights), len(weights), commit_id)
    meta = get_hf_file_metadata(hf_hub_url("alice/m", "config.json", endpoint=localhub.url), token=users.alice)
    assert (meta.etag, meta.size) == (git_sha1(files["config.json"]), len(files["config.json"]))

    for name, data in files.items():
        assert download(localhub, "alice/m", name, users.alice, tmp_path / "c1") == data
    snap = Path(snapshot_download("alice/m", endpoint=localhub.url, token=users.alice, cache_dir=tmp_path / "c2"))
    assert snap.name == commit_id
    got = {p.relative_to(snap).as_posix(): p.read_bytes() for p in snap.rglob("*") if p.is_file()}
    assert got == files

    assert sorted(api.list_repo_files("alice/m")) == sorted(files)
    assert api.file_exists("alice/m", "config.json") and not api.file_exists("alice/m", "missing.txt")
    assert api.repo_exists("alice/m") and not api.repo_exists("alice/nothing")
    check = api.verify_repo_checksums("alice/m", cache_dir=tmp_path / "c2")
    assert check.checked_count == 3 and check.mismatches == [] and check.missing_paths == []


def test_preupload_upload_modes(localhub, users):
    HfApi(endpoint=localhub.url, token=users.alice).create_repo("alice/m")

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    files = [
        {"path": "notes.txt", "size": 5, "sample": b64(b"hello")},
        {"path": "big.txt", "size": 11 * 1024 * 1024, "sample": b64(b"hello")},
        {"path": "blob.dat", "size": 4, "sample": b64(b"\x00\x01\x02\x03")},
        {"path": "adapter_model.bin", "size": 5, "sample": b64(b"hello")},
        {"path": "tokenizer.model", "size": 5, "sample": b64(b"hello")},
        {"path": "x.gguf", "size": 5, "sample": b64(b"hello")},
        {"path": "empty.safetensors", "size": 0, "sample": ""},
    ]
    status, _, body = http(
        "POST", f"{localhub.url}/api/models/alice/m/preupload/main", token=users.alice, body={"files": files}
    )
    assert status == 200
    modes = {f["path"]: f["uploadMode"] for f in json.loads(body)["files"]}
    assert modes == {
        "notes.txt": "regular",
        "big.txt": "lfs",
        "blob.dat": "lfs",
        "adapter_model.bin": "lfs",
        "tokenizer.model": "lfs",
        "x.gguf": "lfs",
        "empty.safetensors": "regular",
    }
    assert all(f["shouldIgnore"] is False and f["oid"] is None for f in json.loads(body)["files"])


def test_create_commit_with_many_files_and_unchanged_files_are_skipped(localhub, users):
    api = HfApi(endpoint=localhub.url, token=users.alice)
    api.create_repo("alice/many")
    contents = {f"shard-{i:02d}.safetensors": os.urandom(1000 + i) for i in range(12)}
    contents.update({f"txt/{i}.txt": f"text {i}\n".encode() for i in range(30)})
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=d) for p, d in contents.items()]
    first = api.create_commit("alice/many", ops, commit_message="many files")
    assert sorted(api.list_repo_files("alice/many")) == sorted(contents)
    uploads = [r for r in localhub.requests if r.method == "PUT" and "/lfs-upload/" in r.path]
    assert len(uploads) == 12 and all(r.status == 200 for r in uploads)

    # Same content again: the preupload oids let the client skip everything, so no new commit.
    again = api.create_commit(
        "alice/many",
        [CommitOperationAdd(path_in_repo=p, path_or_fileobj=d) for p, d in contents.items()],
        commit_message="noop",
    )
    assert again.oid == first.oid
    assert api.model_info("alice/many").sha == first.oid


def test_history_pinned_commit_tag_branch_and_delete(localhub, users, tmp_path):
    api = HfApi(endpoint=localhub.url, token=users.alice)
    api.create_repo("alice/m")
    c1 = api.upload_file(path_or_fileobj=b"version one", path_in_repo="config.json", repo_id="alice/m").oid
    api.create_tag("alice/m", tag="v1.0")
    with pytest.raises(HfHubHTTPError) as e:
        api.create_tag("alice/m", tag="v1.0")
    assert e.value.response.status_code == 409
    c2 = api.upload_file(path_or_fileobj=b"version two!", path_in_repo="config.json", repo_id="alice/m").oid
    assert c1 != c2 and re.fullmatch(r"[0-9a-f]{40}", c2)

    assert download(localhub, "alice/m", "config.json", users.alice, tmp_path / "a", revision=c1) == b"version one"
    assert download(localhub, "alice/m", "config.json", users.alice, tmp_path / "b", revision="v1.0") == b"version one"
    assert download(localhub, "alice/m", "config.json", users.alice, tmp_path / "c") == b"version two!"
    old = Path(
        snapshot_download(
            "alice/m", revision="v1.0", endpoint=localhub.url, token=users.alice, cache_dir=tmp_path / "d"
        )
    )
    assert old.name == c1 and (old / "config.json").read_bytes() == b"version one"

    refs = api.list_repo_refs("alice/m")
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", c2)]
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0", c1)]
    api.create_branch("alice/m", branch="dev", revision=c1)
    assert download(localhub, "alice/m", "config.json", users.alice, tmp_path / "e", revision="dev") == b"version one"
    assert [c.commit_id for c in api.list_repo_commits("alice/m")] == [c2, c1]

    api.delete_file("config.json", repo_id="alice/m")
    assert not api.file_exists("alice/m", "config.json")
    assert api.file_exists("alice/m", "config.json", revision=c1)

    # A stale parent_commit is refused rather than silently overwriting newer history.
    with pytest.raises(HfHubHTTPError) as e:
        api.create_commit("alice/m", [CommitOperationAdd("x.txt", b"x")], commit_message="stale", parent_commit=c1)
    assert e.value.response.status_code == 412
    assert not api.file_exists("alice/m", "x.txt")


def test_private_repo_visible_only_to_owner_and_org_members(localhub, users, tmp_path):
    api, files, _ = publish(localhub, users.alice, tmp_path, "hfl/secret", private=True)
    data = files["config.json"]
    anon = HfApi(endpoint=localhub.url, token=False)
    bob = HfApi(endpoint=localhub.url, token=users.bob)

    with pytest.raises(RepositoryNotFoundError) as e:
        anon.model_info("hfl/secret")
    assert e.value.response.status_code == 401 and not isinstance(e.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError) as e:
        download(localhub, "hfl/secret", "config.json", False, tmp_path / "anon")
    assert not isinstance(e.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError) as e:
        bob.model_info("hfl/secret")
    assert e.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        download(localhub, "hfl/secret", "config.json", users.bob, tmp_path / "bob")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("hfl/secret", endpoint=localhub.url, token=users.bob, cache_dir=tmp_path / "bob2")
    with pytest.raises(RepositoryNotFoundError):
        bob.list_repo_files("hfl/secret")
    assert not bob.repo_exists("hfl/secret")

    assert download(localhub, "hfl/secret", "config.json", users.alice, tmp_path / "alice") == data
    assert download(localhub, "hfl/secret", "config.json", users.carol, tmp_path / "carol") == data  # org member
    # Making it public opens it to everyone.
    api.update_repo_settings("hfl/secret", private=False)
    assert download(localhub, "hfl/secret", "config.json", False, tmp_path / "anon2") == data


def test_read_token_cannot_create_upload_or_delete(localhub, users, tmp_path):
    publish(localhub, users.alice, tmp_path)
    reader = HfApi(endpoint=localhub.url, token=users.alice_read)
    with pytest.raises(HfHubHTTPError) as e:
        reader.create_repo("alice/new")
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:
        reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/m")
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:
        reader.delete_repo("alice/m")
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:
        reader.create_tag("alice/m", tag="nope")
    assert e.value.response.status_code == 403

    # ... but it can read, and nothing was changed.
    assert reader.repo_exists("alice/m") and not reader.repo_exists("alice/new")
    assert not reader.file_exists("alice/m", "x.txt")
    assert reader.list_repo_refs("alice/m").tags == []


def test_gated_repo_info_visible_files_restricted(localhub, users, tmp_path):
    publish(localhub, users.alice, tmp_path, "alice/base")
    localhub.set_gated("alice/base", allowed=["bob"])
    dave = localhub.add_user("dave")

    info = HfApi(endpoint=localhub.url, token=dave).model_info("alice/base")
    assert info.gated == "manual"
    with pytest.raises(GatedRepoError) as e:
        download(localhub, "alice/base", "config.json", dave, tmp_path / "dave")
    assert e.value.response.status_code == 403
    with pytest.raises(GatedRepoError) as e:
        download(localhub, "alice/base", "config.json", False, tmp_path / "anon")
    assert e.value.response.status_code == 401
    with pytest.raises(GatedRepoError):
        snapshot_download("alice/base", endpoint=localhub.url, token=dave, cache_dir=tmp_path / "dave2")
    with pytest.raises(GatedRepoError):
        HfApi(endpoint=localhub.url, token=dave).file_exists("alice/base", "config.json")

    assert download(localhub, "alice/base", "config.json", users.bob, tmp_path / "bob") == b'{"hidden_size": 8}\n'
    assert download(localhub, "alice/base", "config.json", users.alice, tmp_path / "alice") == b'{"hidden_size": 8}\n'


def test_missing_file_revision_folder_and_repo_raise_specific_errors(localhub, users, tmp_path):
    api, _, _ = publish(localhub, users.alice, tmp_path)
    with pytest.raises(RemoteEntryNotFoundError):
        download(localhub, "alice/m", "nope.txt", users.alice, tmp_path / "a")
    with pytest.raises(RevisionNotFoundError):
        download(localhub, "alice/m", "config.json", users.alice, tmp_path / "b", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/m", revision="0123456789abcdef0123456789abcdef01234567")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(
            "alice/m", revision="no-such-tag", endpoint=localhub.url, token=users.alice, cache_dir=tmp_path / "c"
        )
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("alice/m", path_in_repo="no-such-dir"))
    with pytest.raises(RepositoryNotFoundError) as e:
        download(localhub, "alice/nothing", "config.json", users.alice, tmp_path / "d")
    assert not isinstance(e.value, GatedRepoError)
    assert not api.revision_exists("alice/m", "no-such-branch") and api.revision_exists("alice/m", "main")


def test_download_recovers_from_dropped_connection_and_resumes_with_range(localhub, users, tmp_path, monkeypatch):
    api = HfApi(endpoint=localhub.url, token=users.alice)
    api.create_repo("alice/m")
    data = os.urandom(3 * 1024 * 1024 + 123)
    api.upload_file(path_or_fileobj=data, path_in_repo="weights.bin", repo_id="alice/m")

    def gets():
        return [(r.status, r.range) for r in localhub.requests if r.method == "GET" and r.path.endswith("/weights.bin")]

    # The client buffers DOWNLOAD_CHUNK_SIZE (10 MiB) before writing: a cut inside the first 10 MiB loses the
    # buffer, so it retries from byte 0 (no Range) and still ends with the right bytes.
    fault = localhub.faults.drop_after("alice/m", "weights.bin", 1_000_000, times=1)
    localhub.clear_requests()
    assert download(localhub, "alice/m", "weights.bin", users.alice, tmp_path / "a") == data
    assert localhub.faults.get(fault)["hits"] == 1
    assert gets() == [(200, None), (200, None)]

    # With smaller client chunks, whole chunks are kept and the retry asks for the rest with a Range request.
    chunk = 256 * 1024
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    localhub.faults.drop_after("alice/m", "weights.bin", 1_000_000, times=1)
    localhub.clear_requests()
    assert download(localhub, "alice/m", "weights.bin", users.alice, tmp_path / "b") == data
    kept = 1_000_000 // chunk * chunk
    assert gets() == [(200, None), (206, f"bytes={kept}-")]

    # Faults exhausted: a fresh download is a single plain GET.
    localhub.clear_requests()
    assert download(localhub, "alice/m", "weights.bin", users.alice, tmp_path / "c") == data
    assert gets() == [(200, None)]


def test_raw_range_and_head_headers(localhub, users):
    api = HfApi(endpoint=localhub.url, token=users.alice)
    api.create_repo("alice/m")
    data = os.urandom(5000)
    commit = api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="alice/m").oid
    url = f"{localhub.url}/alice/m/resolve/main/w.safetensors"

    status, h, body = http("GET", url, token=users.alice, headers={"Range": "bytes=10-19"})
    assert (status, body, h["Content-Range"], h["Content-Length"]) == (206, data[10:20], "bytes 10-19/5000", "10")
    status, h, body = http("GET", url, token=users.alice, headers={"Range": "bytes=4990-"})
    assert (status, body) == (206, data[4990:])
    status, h, body = http("GET", url, token=users.alice, headers={"Range": "bytes=-7"})
    assert (status, body) == (206, data[-7:])
    status, h, _ = http("GET", url, token=users.alice, headers={"Range": "bytes=5000-"})
    assert status == 416 and h["Content-Range"] == "bytes */5000"
    status, h, body = http("GET", url, token=users.alice)
    assert status == 200 and body == data

    status, h, body = http("HEAD", url, token=users.alice)
    assert status == 200 and body == b""
    assert h["X-Repo-Commit"] == commit
    assert h["ETag"] == f'"{sha256(data)}"' == h["X-Linked-Etag"]
    assert h["X-Linked-Size"] == h["Content-Length"] == "5000"
    assert h["Accept-Ranges"] == "bytes"


def test_lfs_upload_is_verified_and_href_is_one_time(localhub, users):
    api = HfApi(endpoint=localhub.url, token=users.alice)
    api.create_repo("alice/m")
    good = os.urandom(2048)
    bad = bytes(b ^ 0x01 for b in good)  # same size, other content
    oid = sha256(good)
    batch_url = f"{localhub.url}/alice/m.git/info/lfs/objects/batch"
    req = {
        "operation": "upload",
        "transfers": ["basic"],
        "objects": [{"oid": oid, "size": len(good)}],
        "hash_algo": "sha256",
    }

    status, _, body = http("POST", batch_url, token=users.alice, body=req)
    assert status == 200
    obj = json.loads(body)["objects"][0]
    href = obj["actions"]["upload"]["href"]
    assert "ticket=" in href

    # No Authorization header on the upload itself: the href carries its own authorisation.
    status, _, body = http("PUT", href, body=bad)
    assert status == 400 and b"sha256 mismatch" in body
    assert localhub.storage.object_size("model", "alice/m", oid) is None
    status, _, _ = http("PUT", href.replace("ticket=", "ticket=x"), body=good)
    assert status == 403
    status, _, _ = http("PUT", href, body=good[:-1] + b"")  # short body
    assert status == 400
    status, _, _ = http("PUT", href, body=good)
    assert status == 200
    assert localhub.storage.object_size("model", "alice/m", oid) == len(good)
    status, _, _ = http("PUT", href, body=good)  # replay
    assert status == 403
    status, _, _ = http(
        "POST", obj["actions"]["verify"]["href"], token=users.alice, body={"oid": oid, "size": len(good)}
    )
    assert status == 200

    # Once stored, the batch answer has no actions (the client skips the upload).
    status, _, body = http("POST", batch_url, token=users.alice, body=req)
    assert "actions" not in json.loads(body)["objects"][0]
    # A commit may not reference an LFS object that was never uploaded.
    missing = sha256(b"never uploaded")
    ndjson = b"\n".join(
        json.dumps(x).encode()
        for x in (
            {"key": "header", "value": {"summary": "bad"}},
            {"key": "lfsFile", "value": {"path": "x.bin", "algo": "sha256", "oid": missing, "size": 14}},
        )
    )
    status, _, _ = http(
        "POST",
        f"{localhub.url}/api/models/alice/m/commit/main",
        token=users.alice,
        body=ndjson,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert status == 400
    assert localhub.resolve("alice/m") is None


def test_state_survives_restart(tmp_path):
    root = tmp_path / "root"
    with LocalHub(root) as hub:
        token = hub.add_user("alice")
        api, files, commit = publish(hub, token, tmp_path, "alice/keep", private=True)
        api.create_tag("alice/keep", tag="v1")
    with LocalHub(root) as hub:
        api = HfApi(endpoint=hub.url, token=token)
        info = api.model_info("alice/keep")
        assert info.sha == commit and info.private is True
        assert [t.target_commit for t in api.list_repo_refs("alice/keep").tags] == [commit]
        for name, data in files.items():
            assert download(hub, "alice/keep", name, token, tmp_path / "after", revision="v1") == data
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=hub.url, token=False).model_info("alice/keep")


def test_cli_prints_url_serves_and_exits_cleanly_on_sigterm(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hubmerge.testing.localhub",
            "--port",
            "0",
            "--root",
            str(tmp_path / "root"),
            "--user",
            "alice:hf_cli_token_0123456789:write",
            "--user",
            "rob:hf_cli_reader_token:read",
            "--org",
            "hfl:alice",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)  # don't hang the suite if the server never starts
        assert ready, "the server printed no URL within 60 s"
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
        secret = proc.stdout.readline().strip()
        assert len(secret) >= 32, "the admin secret follows the URL"
        users = f"{url}/_localhub/users"
        assert http("POST", users, body={"name": "mallory"})[0] == 403
        status, _, body = http("POST", users, body={"name": "carol"}, headers={"X-Localhub-Admin": secret})
        assert status == 200 and HfApi(endpoint=url).whoami(token=json.loads(body)["token"])["name"] == "carol"
        me = HfApi(endpoint=url).whoami(token="hf_cli_token_0123456789")
        assert me["name"] == "alice" and [o["name"] for o in me["orgs"]] == ["hfl"]
        assert HfApi(endpoint=url).whoami(token="hf_cli_reader_token")["auth"]["accessToken"]["role"] == "read"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert out == ""  # exactly two lines on stdout
    assert "stopped" in err
    assert "hf_cli_token" not in err


def test_verbose_log_masks_tokens_and_upload_tickets(tmp_path, capfd):
    with LocalHub(tmp_path / "root", verbose=True) as hub:
        token = hub.add_user("alice")
        api = HfApi(endpoint=hub.url, token=token)
        api.create_repo("alice/m")
        api.upload_file(path_or_fileobj=os.urandom(1000), path_in_repo="w.bin", repo_id="alice/m")
    err = capfd.readouterr().err
    assert re.search(r"localhub: PUT /_localhub/lfs-upload/\S+\?ticket=\*\*\* 200", err)
    assert "localhub: POST /api/repos/create 200" in err
    assert token not in err
    assert not re.search(r"ticket=(?!\*\*\*)", err)


def test_status_fault_via_control_endpoint(localhub, users, tmp_path):
    publish(localhub, users.alice, tmp_path)
    status, _, body = http(
        "POST",
        f"{localhub.url}/_localhub/faults",
        body={"kind": "status", "match": r"/resolve/main/config\.json$", "status": 503, "times": 1},
        headers=localhub.admin_headers,
    )
    assert status == 200
    (fid,) = json.loads(body)["ids"]
    localhub.clear_requests()
    # With nothing cached, hf_hub_download repeats a HEAD that got a 5xx (with back-off): one failure is absorbed.
    assert download(localhub, "alice/m", "config.json", users.alice, tmp_path / "a") == b'{"hidden_size": 8}\n'
    heads = [r.status for r in localhub.requests if r.method == "HEAD"]
    assert heads == [503, 200]
    _, _, body = http("GET", f"{localhub.url}/_localhub/faults", headers=localhub.admin_headers)
    (f,) = json.loads(body)["faults"]
    assert (f["id"], f["hits"], f["remaining"]) == (fid, 1, 0)

    # model_info is not retried: the 5xx surfaces as is, and the next call works.
    localhub.faults.fail_status(r"^/api/models/alice/m$", 500, times=1, method="GET")
    api = HfApi(endpoint=localhub.url, token=users.alice)
    with pytest.raises(HfHubHTTPError) as e:
        api.model_info("alice/m")
    assert e.value.response.status_code == 500
    assert api.model_info("alice/m").id == "alice/m"

    status, _, _ = http(
        "POST", f"{localhub.url}/_localhub/faults", body={"kind": "nonsense"}, headers=localhub.admin_headers
    )
    assert status == 400
    status, _, body = http("DELETE", f"{localhub.url}/_localhub/faults", headers=localhub.admin_headers)
    assert status == 200 and localhub.faults.list() == []


def test_corrupt_fault_and_on_disk_corruption_are_detectable(localhub, users, tmp_path):
    api, files, _ = publish(localhub, users.alice, tmp_path)
    name = "weights/model.safetensors"
    good = files[name]
    localhub.faults.corrupt("alice/m", name, times=1)
    got = download(localhub, "alice/m", name, users.alice, tmp_path / "a")
    assert len(got) == len(good) and got != good  # same size: the client's size check passes
    check = api.verify_repo_checksums("alice/m", cache_dir=tmp_path / "a")
    assert [m["path"] for m in check.mismatches] == [name]

    obj = localhub.object_path("alice/m", name)
    assert obj.read_bytes() == good
    obj.write_bytes(bytes(reversed(good)))
    got = download(localhub, "alice/m", name, users.alice, tmp_path / "b")
    recorded = {s.rfilename: s for s in api.model_info("alice/m", files_metadata=True).siblings}[name].lfs.sha256
    assert recorded == sha256(good)  # the Hub's record is unchanged ...
    assert len(got) == len(good) and sha256(got) != recorded  # ... but the served bytes no longer match it


def test_hostile_file_names_are_listed(localhub, users, tmp_path):
    api, files, _ = publish(localhub, users.alice, tmp_path)
    localhub.faults.hostile_name("alice/m", "../evil")
    status, _, _ = http(
        "POST",
        f"{localhub.url}/_localhub/faults",
        body={"kind": "hostile_name", "repo": "alice/m", "name": "/etc/x"},
        headers=localhub.admin_headers,
    )
    assert status == 200
    listed = set(api.list_repo_files("alice/m"))
    assert listed == set(files) | {"../evil", "/etc/x"}
    assert {"../evil", "/etc/x"} <= {s.rfilename for s in api.model_info("alice/m").siblings}
    localhub.faults.clear()
    assert set(api.list_repo_files("alice/m")) == set(files)


def test_tree_pagination_and_path_prefix(tmp_path):
    with LocalHub(tmp_path / "root", tree_page_size=2) as hub:
        token = hub.add_user("alice")
        hub.create_repo("alice/t")
        names = ["a/1.txt", "a/2.txt", "a/b/3.txt", "c.txt", "d.txt"]
        hub.commit_files("alice/t", {n: n.encode() for n in names})
        api = HfApi(endpoint=hub.url, token=token)
        everything = list(api.list_repo_tree("alice/t", recursive=True))
        assert sorted(e.path for e in everything) == sorted(names + ["a", "a/b"])
        assert sum("cursor=" in r.path for r in hub.requests) >= 3  # 7 entries, 2 per page
        assert sorted(e.path for e in api.list_repo_tree("alice/t", path_in_repo="a")) == ["a/1.txt", "a/2.txt", "a/b"]
        assert sorted(api.list_repo_files("alice/t")) == sorted(names)


def test_hostile_inputs_are_rejected_not_crashing(localhub, users, tmp_path):
    publish(localhub, users.alice, tmp_path)
    url = localhub.url
    status, h, _ = http("GET", f"{url}/api/models/..%2F..%2Fetc/passwd", token=users.alice)
    assert status == 404 and h["X-Error-Code"] == "RepoNotFound"
    status, h, _ = http("HEAD", f"{url}/alice/m/resolve/main/..%2F..%2F..%2Fauth.json", token=users.alice)
    assert status == 404 and h["X-Error-Code"] == "EntryNotFound"
    status, _, _ = http("POST", f"{url}/api/repos/create", token=users.alice, body={"name": "../x"})
    assert status == 400
    ndjson = b"\n".join(
        json.dumps(x).encode()
        for x in (
            {"key": "header", "value": {"summary": "evil"}},
            {"key": "file", "value": {"path": "../escape.txt", "content": "eA==", "encoding": "base64"}},
        )
    )
    status, _, _ = http(
        "POST",
        f"{url}/api/models/alice/m/commit/main",
        token=users.alice,
        body=ndjson,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert status == 400
    assert "../escape.txt" not in HfApi(endpoint=url, token=users.alice).list_repo_files("alice/m")
    status, _, _ = http("GET", f"{url}/api/models/alice/m", token=users.alice)
    assert status == 200  # still serving


def test_dataset_repo_round_trip(localhub, users, tmp_path):
    api = HfApi(endpoint=localhub.url, token=users.alice)
    api.create_repo("hfl/data", repo_type="dataset", private=True)
    rows = b'{"text": "hello"}\n' * 100
    api.upload_file(path_or_fileobj=rows, path_in_repo="train.jsonl", repo_id="hfl/data", repo_type="dataset")
    got = hf_hub_download(
        "hfl/data", "train.jsonl", repo_type="dataset", endpoint=localhub.url, token=users.carol, cache_dir=tmp_path
    )
    assert Path(got).read_bytes() == rows
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("hfl/data", "train.jsonl", endpoint=localhub.url, token=users.carol, cache_dir=tmp_path / "m")


def test_concurrent_commits_to_one_branch_are_serialised(localhub, users):
    api = HfApi(endpoint=localhub.url, token=users.alice)
    api.create_repo("alice/busy")
    errors: list[BaseException] = []

    def push(i: int) -> None:
        try:
            api.upload_file(path_or_fileobj=f"file {i}\n".encode(), path_in_repo=f"f{i}.txt", repo_id="alice/busy")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # No lost update: every commit built on the previous head.
    assert sorted(api.list_repo_files("alice/busy")) == sorted(f"f{i}.txt" for i in range(8))
    assert len(api.list_repo_commits("alice/busy")) == 8


def test_control_endpoints_refuse_requests_without_the_admin_secret(localhub):
    """Any local process can reach loopback: without the start-up secret it can neither mint a token for an existing
    user nor change how the server behaves."""
    localhub.add_user("alice")
    wrong = {"X-Localhub-Admin": localhub.admin_secret[:-1] + ("x" if localhub.admin_secret[-1] != "x" else "y")}
    attempts = [
        ("POST", "users", {"name": "alice", "token": "hf_stolen_token_0123456789"}),
        ("POST", "users", {"name": "mallory"}),
        ("GET", "faults", None),
        ("POST", "faults", {"kind": "status", "match": ".*", "status": 503}),
        ("DELETE", "faults", None),
        ("DELETE", "faults/0", None),
    ]
    for method, path, body in attempts:
        for headers in (None, wrong, {"X-Localhub-Admin": ""}):
            status, _, answer = http(method, f"{localhub.url}/_localhub/{path}", body=body, headers=headers)
            assert status == 403 and b"admin secret" in answer, (method, path, headers, status)
    assert localhub.faults.list() == []
    assert localhub.storage.auth.authenticate("hf_stolen_token_0123456789") is None
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=localhub.url).whoami(token="hf_stolen_token_0123456789")
    assert http("GET", f"{localhub.url}/_localhub/health")[0] == 200  # the health check stays open
    status, _, _ = http("GET", f"{localhub.url}/_localhub/faults", headers=localhub.admin_headers)
    assert status == 200
