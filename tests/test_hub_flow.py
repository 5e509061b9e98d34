"""The Hub flow end to end: the ``hubmerge`` command in its own process, against the project's local Hub server,
through the real huggingface_hub client. Access control is always checked with a fresh cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from support import ALPACA_REPO as ALPACA
from support import BASE_REPO as BASE
from support import LLAMA_REPO as LLAMA
from support import hf_tensors, hubmerge, one_line_error

from hubmerge import merge
from hubmerge.verification.hashing import file_digest
from hubmerge.verification.known import known_hashes

CANARY = "hf_CANARYcanaryCANARYcanary0000000000"


def test_plus_recipe_by_hub_ids_with_private_base_pushed_privately(hub, tmp_path):
    done = hubmerge(
        hub,
        tmp_path,
        LLAMA,
        ALPACA,
        "--base",
        BASE,
        "--out",
        tmp_path / "out",
        "--push-to",
        "alice/alpaca-plus-merged",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    recipe = json.loads((tmp_path / "out" / "hubmerge.json").read_text())
    assert recipe["base"]["repo_id"] == BASE and recipe["base"]["commit"] == hub.resolve(BASE)
    assert [a["repo_id"] for a in recipe["adapters"]] == [LLAMA, ALPACA]
    for a, repo in zip(recipe["adapters"], (LLAMA, ALPACA)):
        assert a["commit"] == hub.resolve(repo)
        weights = "adapter_model.bin" if repo == LLAMA else "adapter_model.safetensors"
        assert a["files"][weights] == hub.file_entry(repo, weights).sha256

    # the pushed repo: private, the right files, the card
    owner = HfApi(endpoint=hub.url, token=hub.tokens["alice"])
    info = owner.model_info("alice/alpaca-plus-merged", files_metadata=True)
    assert info.private
    names = {s.rfilename for s in info.siblings}
    assert {"model.safetensors", "config.json", "tokenizer.model", "hubmerge.json", "README.md"} <= names
    card = Path(
        hf_hub_download(
            "alice/alpaca-plus-merged",
            "README.md",
            endpoint=hub.url,
            token=hub.tokens["alice"],
            cache_dir=tmp_path / "c1",
        )
    ).read_text()
    for s in info.siblings:
        if s.lfs:
            assert s.lfs.sha256 in card  # the card lists the SHA256 of every uploaded file
    assert f"{LLAMA}/tree/{hub.resolve(LLAMA)}" in card and f"{BASE}/tree/{hub.resolve(BASE)}" in card
    assert "base_model:" in card and "- hubmerge" in card and "library_name: transformers" in card
    assert "vocabulary: 297 tokens" in card

    # anonymous (fresh cache) and another user are refused; the owner can read
    with pytest.raises(RepositoryNotFoundError) as anon:
        hf_hub_download(
            "alice/alpaca-plus-merged", "config.json", endpoint=hub.url, token=False, cache_dir=tmp_path / "anon"
        )
    assert not isinstance(anon.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(
            "alice/alpaca-plus-merged",
            "config.json",
            endpoint=hub.url,
            token=hub.tokens["bob"],
            cache_dir=tmp_path / "bob",
        )
    pulled = hf_hub_download(
        "alice/alpaca-plus-merged",
        "model.safetensors",
        endpoint=hub.url,
        token=hub.tokens["alice"],
        cache_dir=tmp_path / "c2",
    )
    assert (
        file_digest(Path(pulled))
        == recipe["files"]["hf/model.safetensors" if "hf/model.safetensors" in recipe["files"] else "model.safetensors"]
    )


def test_revision_pinning_by_commit_and_tag(hub, tmp_path, models):
    api = HfApi(endpoint=hub.url, token=hub.tokens["hfl"])
    repo = "hfl/pinned-adapter"
    api.create_repo(repo)
    first, second = models.adapter(hub.local["base"], seed=51), models.adapter(hub.local["base"], seed=52)
    api.upload_folder(repo_id=repo, folder_path=first)
    first_commit = hub.resolve(repo)
    api.create_tag(repo, tag="v1")
    api.upload_folder(repo_id=repo, folder_path=second)
    assert hub.resolve(repo) != first_commit
    base = hub.local["base"]
    want = hf_tensors(merge([first], base, tmp_path / "local", progress=False).out)
    for rev in (first_commit, "v1"):
        done = hubmerge(hub, tmp_path, f"{repo}@{rev}", "--base", base, "--out", tmp_path / rev, "-q")
        assert done.returncode == 0, done.stderr
        recipe = json.loads((tmp_path / rev / "hubmerge.json").read_text())
        assert recipe["adapters"][0]["commit"] == first_commit and recipe["adapters"][0]["revision"] == rev
        got = hf_tensors(tmp_path / rev)
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "case,token,fragments",
    [
        ("wrong-token", CANARY, ("rejected your token (401)", "hf auth login")),
        ("missing-repo", "alice", ("hfl/no-such-adapter", "not found", "check the name")),
        ("private-base-anonymous", None, (BASE, "not found, or private", "not logged in")),
        ("private-base-other-user", "bob", (BASE, "your token cannot see it")),
        ("gated", "bob", ("hfl/gated-adapter is gated", "request access")),
        ("bad-revision", "alice", ("revision 'nope' not found",)),
    ],
)
def test_access_problems_are_one_line_errors(hub, tmp_path, models, case, token, fragments):
    if case == "gated":
        api = HfApi(endpoint=hub.url, token=hub.tokens["hfl"])
        api.create_repo("hfl/gated-adapter", exist_ok=True)
        api.upload_folder(repo_id="hfl/gated-adapter", folder_path=hub.local[LLAMA])
        hub.set_gated("hfl/gated-adapter", allowed=["alice"])
    adapter = {
        "missing-repo": "hfl/no-such-adapter",
        "gated": "hfl/gated-adapter",
        "bad-revision": f"{LLAMA}@nope",
    }.get(case, LLAMA)
    base = BASE if case.startswith("private-base") else hub.local["base"]
    done = hubmerge(hub, tmp_path, adapter, "--base", base, "--out", tmp_path / "out", token=token)
    line = one_line_error(done)
    for fragment in fragments:
        assert fragment in line, line
    assert CANARY not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()


def test_corrupt_lfs_object_fails_verification_and_is_not_kept(hub, tmp_path):
    repo = "hfl/corrupt-adapter"
    api = HfApi(endpoint=hub.url, token=hub.tokens["hfl"])
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=hub.local[ALPACA])
    fault = hub.faults.corrupt(repo, "adapter_model.safetensors")
    done = hubmerge(hub, tmp_path, repo, "--base", hub.local["base"], "--out", tmp_path / "out")
    line = one_line_error(done)
    assert "adapter_model.safetensors" in line and "SHA256" in line and "even after downloading it again" in line
    assert hub.faults.get(fault)["hits"] == 2  # downloaded, found bad, downloaded once more, then refused
    assert not (tmp_path / "out").exists()
    cached = list((tmp_path / "cache").rglob("adapter_model.safetensors"))
    assert all(not p.exists() for p in cached)  # the bad file is not left for a later run to pick up


def test_interrupted_download_is_retried_and_completes(hub, tmp_path):
    fault = hub.faults.drop_after(ALPACA, "adapter_model.safetensors", 4096)
    done = hubmerge(hub, tmp_path, LLAMA, ALPACA, "--base", BASE, "--out", tmp_path / "out", "-q")
    assert done.returncode == 0, done.stderr
    assert hub.faults.get(fault)["hits"] == 1
    recipe = json.loads((tmp_path / "out" / "hubmerge.json").read_text())
    assert (
        recipe["adapters"][1]["files"]["adapter_model.safetensors"]
        == hub.file_entry(ALPACA, "adapter_model.safetensors").sha256
    )


def test_push_into_existing_repo_needs_overwrite(hub, tmp_path):
    done = hubmerge(hub, tmp_path, LLAMA, "--base", hub.local["base"], "--out", tmp_path / "out", "-q")
    assert done.returncode == 0, done.stderr
    api = HfApi(endpoint=hub.url, token=hub.tokens["alice"])
    api.create_repo("alice/existing", private=True)
    api.upload_file(path_or_fileobj=b"old", path_in_repo="old.txt", repo_id="alice/existing")
    line = one_line_error(hubmerge(hub, tmp_path, "push", tmp_path / "out", "alice/existing"))
    assert "already has 1 file;" in line and "--overwrite" in line
    assert [s.rfilename for s in api.model_info("alice/existing").siblings] == ["old.txt"]
    done = hubmerge(hub, tmp_path, "push", tmp_path / "out", "alice/existing", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert "alice/existing (private)" in done.stdout
    names = {s.rfilename for s in api.model_info("alice/existing").siblings}
    assert "old.txt" not in names and {"model.safetensors", "README.md", "hubmerge.json"} <= names
    line = one_line_error(hubmerge(hub, tmp_path, "push", tmp_path / "out", "hfl/not-mine"))
    assert "403" in line or "may not" in line
    line = one_line_error(hubmerge(hub, tmp_path, "push", tmp_path / "out", "alice/read-only", token="alice-read"))
    assert "may not" in line


def test_dry_run_downloads_no_weights_and_catches_reversed_order(hub, tmp_path):
    done = hubmerge(hub, tmp_path, LLAMA, ALPACA, "--base", BASE, "--dry-run")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"base: {BASE}@" in out and "to download" in out
    assert "adapter 1: hfl/llama-plus-tiny@" in out and "r=8 alpha=32 scale=4" in out and "vocab 296" in out
    assert "adapter 2: hfl/alpaca-plus-tiny@" in out and "r=16" in out and "vocab 297" in out
    assert "write: hf" in out
    downloaded = {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() or p.is_symlink()}
    assert "adapter_config.json" in downloaded and "tokenizer.model" in downloaded
    assert not downloaded & {"adapter_model.bin", "adapter_model.safetensors", "model.safetensors"}
    line = one_line_error(hubmerge(hub, tmp_path, ALPACA, LLAMA, "--base", BASE, "--dry-run"))
    assert "reverse the order" in line


def test_known_hash_table_catches_a_mixed_up_tokenizer(hub, tmp_path, monkeypatch):
    # Teach the table the tiny LLaMA-type tokenizer, as the real table knows the Chinese-LLaMA one, then ship it
    # with an Alpaca-type adapter: the hash check must name the mix-up before any shape check runs.
    import hubmerge.verification.known as verify

    table = json.loads(json.dumps(known_hashes()))
    table["tokenizers"].append(
        {
            "sha256": file_digest(hub.local[LLAMA] / "tokenizer.model"),
            "name": "tiny LLaMA-type tokenizer",
            "type": "llama",
            "vocab_size": 296,
        }
    )
    table["tokenizers"].append(
        {
            "sha256": file_digest(hub.local[ALPACA] / "tokenizer.model"),
            "name": "tiny Alpaca-type tokenizer",
            "type": "alpaca",
            "vocab_size": 297,
        }
    )
    monkeypatch.setattr(verify, "known_hashes", lambda: table)

    mixed = tmp_path / "mixed"
    shutil.copytree(hub.local[ALPACA], mixed)
    shutil.copy(hub.local[LLAMA] / "tokenizer.model", mixed / "tokenizer.model")
    with pytest.raises(Exception) as err:
        merge([mixed], hub.local["base"], tmp_path / "out", progress=False)
    assert "tiny LLaMA-type tokenizer" in str(err.value) and "tiny Alpaca-type tokenizer" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_known_adapter_with_a_different_hash_is_refused(hub, tmp_path):
    repo = "ziqingyang/chinese-alpaca-lora-7b"  # a tiny stand-in under the real name: its hash is not the published
    api = HfApi(endpoint=hub.url, token=hub.add_user("ziqingyang"))
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=hub.local[LLAMA])
    line = one_line_error(hubmerge(hub, tmp_path, repo, "--base", hub.local["base"], "--out", tmp_path / "o"))
    assert "adapter_model.bin" in line and "published Chinese-Alpaca-7B" in line


def test_verify_command_on_repo_cache_and_output(hub, tmp_path):
    done = hubmerge(hub, tmp_path, "verify", ALPACA)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "adapter_model.safetensors" in done.stdout and "ok" in done.stdout
    snapshot = next((tmp_path / "cache").glob("models--hfl--alpaca-plus-tiny/snapshots/*"))
    done = hubmerge(hub, tmp_path, "verify", snapshot)
    assert done.returncode == 0 and "files verified" in done.stdout
    blob = (snapshot / "adapter_model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    done = hubmerge(hub, tmp_path, "verify", snapshot)
    assert done.returncode == 1 and "MISMATCH" in done.stdout and "1 FAILED" in done.stdout
    merged = hubmerge(hub, tmp_path, LLAMA, "--base", hub.local["base"], "--out", tmp_path / "out", "-q")
    assert merged.returncode == 0
    assert hubmerge(hub, tmp_path, "verify", tmp_path / "out").returncode == 0
    (tmp_path / "out" / "config.json").write_text("{}")
    done = hubmerge(hub, tmp_path, "verify", tmp_path / "out")
    assert done.returncode == 1 and "config.json" in done.stdout


def test_token_never_leaves_the_process(hub, tmp_path):
    canary = hub.add_user("carol", token="hf_CAROLcarolCAROLcarol0000000000000")
    done = hubmerge(
        hub,
        tmp_path,
        LLAMA,
        "--base",
        hub.local["base"],
        "--out",
        tmp_path / "out",
        "--push-to",
        "carol/merged",
        "--token",
        canary,
    )
    assert done.returncode == 0, done.stderr
    texts = [done.stdout, done.stderr] + [
        p.read_text(errors="ignore")
        for p in (tmp_path / "out").rglob("*")
        if p.is_file() and p.stat().st_size < 10_000_000
    ]
    card = hf_hub_download("carol/merged", "README.md", endpoint=hub.url, token=canary, cache_dir=tmp_path / "c")
    texts.append(Path(card).read_text())
    assert not [t for t in texts if canary in t]
