"""Trust on the local side (issue 10): nothing of the user's is deleted or published, whatever the flags or the files
say. ``--overwrite`` replaces only an empty folder or what a previous hubmerge run wrote; ``hubmerge push`` uploads only
files inside the folder it is given; the local Hub's control endpoints need the admin secret; the Space uses the
machine's own login only when nobody else can reach it.

Every refusal is the real CLI's one line, and the whole test folder (every file's SHA256, every folder, every link) is
the same afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support import BASE_REPO, LLAMA_REPO

from hubmerge.cli import main
from hubmerge.errors import OutputError
from hubmerge.output.staging import Journal, check_output, move_into_place
from hubmerge.verification.hashing import file_digest

THESIS = "four years of work, no other copy"


def snapshot(root: Path) -> dict[str, str]:
    """Everything under ``root``: relative path -> SHA256 (files), ``dir`` (folders) or ``-> target`` (links)."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = file_digest(path)
    return found


def user_folder(path: Path) -> Path:
    """A folder of the user's: a thesis and a subfolder with notes."""
    (path / "sub").mkdir(parents=True, exist_ok=True)
    (path / "thesis.txt").write_text(THESIS)
    (path / "sub" / "notes.txt").write_text("notes")
    return path


def run_cli(args, capsys, quiet: bool = True) -> tuple[int, str]:
    capsys.readouterr()  # building the inputs may print
    code = main([*map(str, args), *(["--quiet"] if quiet else [])])
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, fragments) -> str:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tiny(models):
    base = models.base()
    return base, models.adapter(base, seed=26)


@pytest.fixture(scope="module")
def previous(tiny, tmp_path_factory) -> Path:
    """A finished hubmerge output (written once; tests copy it)."""
    base, adapter = tiny
    out = tmp_path_factory.mktemp("previous") / "merged"
    assert main([str(adapter), "--base", str(base), "--out", str(out), "--quiet"]) == 0
    return out


# ---------------------------------------------------------------------------------------------------------------------
# --overwrite: each builder sets up tmp_path (and may chdir / set HOME) and returns (command args, message fragments).


def _merge(tiny, out, *extra):
    base, adapter = tiny
    return [adapter, "--base", base, "--out", out, *extra]


def out_is_the_working_folder(t):
    t.chdir(user_folder(t.tmp / "work"))
    return _merge(t.tiny, ".", "--overwrite"), ("work: is the working folder", "never replaces")


def out_is_a_parent_of_the_working_folder(t):
    t.chdir(user_folder(t.tmp / "work") / "sub")
    return _merge(t.tiny, "..", "--overwrite"), ("work: is the working folder or one of its parents",)


def out_dotdot_names_a_users_folder(t):
    some = user_folder(t.tmp / "some")
    (some / "dir").mkdir()
    t.chdir(t.tmp)
    return _merge(t.tiny, "some/dir/..", "--overwrite"), (f"{some}: holds ", "which hubmerge did not write")


def out_is_the_home_folder(t):
    t.monkeypatch.setenv("HOME", str(user_folder(t.tmp / "home")))
    return _merge(t.tiny, "~", "--overwrite"), ("home: is your home folder", "never replaces")


def out_is_a_parent_of_the_home_folder(t):
    t.monkeypatch.setenv("HOME", str(user_folder(t.tmp / "users" / "me")))
    return _merge(t.tiny, t.tmp / "users", "--overwrite"), ("users: is your home folder or one of its parents",)


def out_is_the_root(t):
    return _merge(t.tiny, "/", "--overwrite"), ("/: is the root folder", "never replaces")


def out_is_an_input(t):
    base = t.tmp / "base"
    shutil.copytree(t.tiny[0], base)
    return [t.tiny[1], "--base", base, "--out", base, "--overwrite"], ("base, an input", "never modifies")


def out_is_the_cache(t):
    cache = user_folder(t.tmp / "hf-cache")
    return _merge(t.tiny, cache, "--overwrite", "--cache-dir", cache), ("hf-cache, an input or the download cache",)


def previous_output_plus_a_users_file(t):
    out = t.tmp / "merged"
    shutil.copytree(t.previous, out)
    (out / "thesis.txt").write_text(THESIS)
    return _merge(t.tiny, out, "--overwrite"), ("merged: holds thesis.txt, which hubmerge did not write", "move")


def previous_output_plus_a_users_folder(t):
    out = t.tmp / "merged"
    shutil.copytree(t.previous, out)
    (out / "sub").mkdir()
    return _merge(t.tiny, out, "--overwrite"), ("merged: holds sub, which hubmerge did not write",)


def previous_output_with_a_listed_file_replaced_by_a_link(t):
    out = t.tmp / "merged"
    shutil.copytree(t.previous, out)
    user_folder(t.tmp / "work")
    (out / "config.json").unlink()
    (out / "config.json").symlink_to(t.tmp / "work" / "thesis.txt")
    return _merge(t.tiny, out, "--overwrite"), ("holds config.json (a symbolic link)",)


def folder_without_a_recipe(t):
    return _merge(t.tiny, user_folder(t.tmp / "merged"), "--overwrite"), ("merged: holds sub, which hubmerge did not",)


def recipe_listing_the_users_files(t):
    # a hubmerge.json is only a list of names: it lets --overwrite remove the files it names, never the folder around
    out = user_folder(t.tmp / "merged")
    (out / "hubmerge.json").write_text(json.dumps({"files": {"thesis.txt": "0" * 64}}))
    return _merge(t.tiny, out, "--overwrite"), ("merged: holds sub, which hubmerge did not write",)


def partial_name_taken_by_a_users_folder(t):
    user_folder(t.tmp / ".merged.hubmerge-partial")
    return _merge(t.tiny, t.tmp / "merged"), (".merged.hubmerge-partial: holds sub, which hubmerge did not write",)


def out_is_a_file(t):
    (t.tmp / "merged").write_text(THESIS)
    return _merge(t.tiny, t.tmp / "merged", "--overwrite"), ("merged: is a file",)


def convert_into_the_working_folder(t):
    t.chdir(user_folder(t.tmp / "work"))
    return ["convert", t.tiny[0], "--out", ".", "--overwrite"], ("work: is the working folder",)


def convert_over_a_users_folder(t):
    out = user_folder(t.tmp / "converted")
    return ["convert", t.tiny[0], "--out", out, "--overwrite"], ("converted: holds sub, which hubmerge did not write",)


OVERWRITE_CASES: list[Callable] = [
    out_is_the_working_folder,
    out_is_a_parent_of_the_working_folder,
    out_dotdot_names_a_users_folder,
    out_is_the_home_folder,
    out_is_a_parent_of_the_home_folder,
    out_is_the_root,
    out_is_an_input,
    out_is_the_cache,
    previous_output_plus_a_users_file,
    previous_output_plus_a_users_folder,
    previous_output_with_a_listed_file_replaced_by_a_link,
    folder_without_a_recipe,
    recipe_listing_the_users_files,
    partial_name_taken_by_a_users_folder,
    out_is_a_file,
    convert_into_the_working_folder,
    convert_over_a_users_folder,
]


class Setup:
    def __init__(self, tmp: Path, tiny, previous: Path, monkeypatch):
        self.tmp, self.tiny, self.previous, self.monkeypatch = tmp, tiny, previous, monkeypatch

    def chdir(self, path: Path) -> None:
        self.monkeypatch.chdir(path)


@pytest.mark.parametrize("build", OVERWRITE_CASES, ids=[c.__name__ for c in OVERWRITE_CASES])
def test_overwrite_refuses_and_nothing_is_lost(build, tiny, previous, tmp_path, monkeypatch, capsys):
    args, fragments = build(Setup(tmp_path, tiny, previous, monkeypatch))
    before = snapshot(tmp_path)
    inputs_before = snapshot(tiny[0]), snapshot(tiny[1])
    assert_one_line(*run_cli(args, capsys), fragments)
    assert snapshot(tmp_path) == before
    assert (snapshot(tiny[0]), snapshot(tiny[1])) == inputs_before


def test_overwrite_replaces_a_previous_output_and_nothing_else(tiny, previous, tmp_path, capsys):
    user_folder(tmp_path / "work")
    out = tmp_path / "merged"
    shutil.copytree(previous, out)
    around = snapshot(tmp_path / "work")
    code, err = run_cli(_merge(tiny, out, "--overwrite", "--dtype", "bfloat16"), capsys)
    assert code == 0, err
    recipe = json.loads((out / "hubmerge.json").read_text())
    assert recipe["merge"]["dtype"] == "bfloat16"  # the new output ...
    assert set(snapshot(out)) == set(recipe["files"]) | {"hubmerge.json"}  # ... and nothing of the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "work"]  # no partial, no moved-aside folder
    assert snapshot(tmp_path / "work") == around


def test_overwrite_replaces_an_empty_folder(tiny, tmp_path, capsys):
    (tmp_path / "merged").mkdir()
    code, err = run_cli(_merge(tiny, tmp_path / "merged", "--overwrite"), capsys)
    assert code == 0, err
    assert (tmp_path / "merged" / "hubmerge.json").is_file()


def test_overwrite_takes_over_hubmerges_own_partial_folder(tiny, previous, tmp_path, capsys):
    """A stopped run's partial folder (journal, finished files, the file it was writing) is hubmerge's: a new run
    with other options starts afresh in it, and replaces the previous output."""
    out, staging = tmp_path / "merged", tmp_path / ".merged.hubmerge-partial"
    shutil.copytree(previous, out)
    journal = Journal(staging, "a stopped run of another command")
    (staging / "model-00001-of-00002.safetensors").write_bytes(b"finished")
    journal.record(
        staging / "model-00001-of-00002.safetensors", file_digest(staging / "model-00001-of-00002.safetensors")
    )
    (staging / "model-00002-of-00002.safetensors").write_bytes(b"half writ")  # not in the journal yet
    code, err = run_cli(_merge(tiny, out, "--overwrite", "--dtype", "float32"), capsys)
    assert code == 0, err
    assert json.loads((out / "hubmerge.json").read_text())["merge"]["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_an_out_that_is_a_partial_folder_may_be_replaced(tmp_path):
    staging = tmp_path / ".merged.hubmerge-partial"
    Journal(staging, "x")
    (staging / "shard.bin").write_bytes(b"half")
    check_output(staging, [], overwrite=True)  # hubmerge's own folder: no error
    (staging / "sub").mkdir()
    (staging / "sub" / "link").symlink_to(tmp_path)
    with pytest.raises(OutputError, match="sub/link \\(a symbolic link\\)"):
        check_output(staging, [], overwrite=True)


def test_a_users_file_that_appears_during_the_merge_is_kept(previous, tmp_path):
    out, staging = tmp_path / "merged", tmp_path / "new"
    shutil.copytree(previous, out)
    shutil.copytree(previous, staging)
    check_output(out, [], overwrite=True)
    (out / "thesis.txt").write_text(THESIS)  # saved there while the merge ran
    with pytest.raises(OutputError, match="thesis.txt, which hubmerge did not write"):
        move_into_place(staging, out)
    assert (out / "thesis.txt").read_text() == THESIS
    assert snapshot(staging) == snapshot(previous)


# ---------------------------------------------------------------------------------------------------------------------
# hubmerge push: only regular files inside the folder, whatever its hubmerge.json names.

CANARY = b"SECRET-CANARY-of-this-machine"
PUSHED = "alice/trust-pushed"


@pytest.fixture(scope="module")
def pushed(_published_hub, previous):
    """``PUSHED`` holds a clean push of ``previous``; the hostile pushes below must leave it as it is."""
    from hubmerge.inputs.hub import Hub
    from hubmerge.publish import push

    hub = _published_hub
    push(previous, PUSHED, hub=Hub(endpoint=hub.url, token=hub.tokens["alice"]))
    return hub


def _outside(tmp: Path) -> Path:
    outside = tmp / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "hostname").write_bytes(CANARY)
    return outside


def _edit_recipe(folder: Path, **changes) -> None:
    recipe = json.loads((folder / "hubmerge.json").read_text())
    recipe.update(changes)
    (folder / "hubmerge.json").write_text(json.dumps(recipe))


def _hf_folder(rel: str) -> dict:
    return {"hf": {"folder": rel}}


def recipe_names_a_folder_outside(out, outside):
    _edit_recipe(
        out, formats=_hf_folder("../outside"), files={"../outside/hostname": file_digest(outside / "hostname")}
    )
    return ("hubmerge.json: names '../outside'", "only files inside")


def recipe_names_an_absolute_path(out, outside):
    _edit_recipe(
        out, formats=_hf_folder(str(outside)), files={str(outside / "hostname"): file_digest(outside / "hostname")}
    )
    return (f"names '{outside}'", "only files inside")


def recipe_names_a_file_outside_among_the_real_ones(out, outside):
    recipe = json.loads((out / "hubmerge.json").read_text())
    _edit_recipe(out, files={**recipe["files"], "../outside/hostname": file_digest(outside / "hostname")})
    return ("names '../outside/hostname'",)


def listed_file_is_a_link_outside(out, outside):
    recipe = json.loads((out / "hubmerge.json").read_text())
    (out / "config.json").unlink()
    (out / "config.json").symlink_to(outside / "hostname")
    _edit_recipe(out, files={**recipe["files"], "config.json": file_digest(outside / "hostname")})
    return ("config.json: is a symbolic link", "regular files")


def hf_folder_is_a_link_outside(out, outside):
    (out / "hf").symlink_to(outside)
    _edit_recipe(out, formats=_hf_folder("hf"), files={"hf/hostname": file_digest(outside / "hostname")})
    return ("hf: is a symbolic link",)


def recipe_is_a_link_outside(out, outside):
    (outside / "hubmerge.json").write_bytes((out / "hubmerge.json").read_bytes())
    (out / "hubmerge.json").unlink()
    (out / "hubmerge.json").symlink_to(outside / "hubmerge.json")
    return ("hubmerge.json: is a symbolic link",)


PUSH_CASES: list[Callable] = [
    recipe_names_a_folder_outside,
    recipe_names_an_absolute_path,
    recipe_names_a_file_outside_among_the_real_ones,
    listed_file_is_a_link_outside,
    hf_folder_is_a_link_outside,
    recipe_is_a_link_outside,
]


def _hub_holds(hub, data: bytes) -> bool:
    return any(data in p.read_bytes() for p in Path(hub.root).rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.parametrize("build", PUSH_CASES, ids=[c.__name__ for c in PUSH_CASES])
def test_push_uploads_nothing_from_outside_the_folder(build, pushed, previous, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    hub = pushed
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", hub.tokens["alice"])
    api = HfApi(endpoint=hub.url, token=hub.tokens["alice"])
    out = tmp_path / "merged"
    shutil.copytree(previous, out)
    fragments = build(out, _outside(tmp_path))
    before = snapshot(tmp_path), api.model_info(PUSHED).sha, sorted(api.list_repo_files(PUSHED))
    for target, extra in ((PUSHED, ["--overwrite"]), ("alice/trust-pushed-new", [])):
        assert_one_line(
            *run_cli(["push", out, target, *extra, "--cache-dir", tmp_path / "cache"], capsys, quiet=False), fragments
        )
    assert (snapshot(tmp_path), api.model_info(PUSHED).sha, sorted(api.list_repo_files(PUSHED))) == before
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/trust-pushed-new")  # refused before the repo is created
    assert not _hub_holds(hub, CANARY)


# ---------------------------------------------------------------------------------------------------------------------
# --token: the help says HF_TOKEN / `hf auth login` first, and that a command line is visible to others.


@pytest.mark.parametrize("command", [[], ["push"], ["verify"]], ids=["merge", "push", "verify"])
def test_help_shows_the_login_before_token_and_warns_about_ps(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    option = text[text.index("--token TOKEN ") :]  # the option's own help, after the usage line
    assert option.index("HF_TOKEN") < option.index("visible to other users of this machine in `ps`")
    assert "Hub login: run `hf auth login` once, or set HF_TOKEN" in text


# ---------------------------------------------------------------------------------------------------------------------
# The Space off Spaces: gradio's published mock token stands for this machine's login only on 127.0.0.1.


@pytest.fixture(params=["127.0.0.1", "0.0.0.0"])
def space(request, _published_hub, monkeypatch, tmp_path):
    """space/app.py launched on ``request.param`` with gradio's mocked OAuth as it is (signed in as the machine's
    login, alice, whose token is in HF_TOKEN; the session token is gradio's fixed placeholder)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio.oauth
    from huggingface_hub import HfApi, constants

    hub = _published_hub
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("SYSTEM", raising=False)
    monkeypatch.setenv("HF_TOKEN", hub.tokens["alice"])  # this machine's own login
    monkeypatch.setattr(gradio.oauth, "whoami", lambda *a, **k: HfApi(endpoint=hub.url).whoami(hub.tokens["alice"]))
    spec = importlib.util.spec_from_file_location(
        "hubmerge_space_app_trust", Path(__file__).parents[1] / "space/app.py"
    )
    app = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = app
    spec.loader.exec_module(app)
    demo = app.create_app(app.Settings(endpoint=hub.url, workdir=tmp_path / "jobs", allow_local_paths=True))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = demo.launch(
        server_name=request.param, server_port=port, prevent_thread_lock=True, quiet=True, share=False, **app.LAUNCH
    )
    try:
        yield app, demo, url.rstrip("/"), hub
    finally:
        demo.close()


def test_space_lends_the_machine_login_for_the_mock_token_only_on_loopback(space, monkeypatch):
    import gradio as gr
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    app, demo, url, hub = space
    client = Client(url, oauth_token=app.GRADIO_MOCK_TOKEN, verbose=False)
    # the page's account line, as the load event fills it for gradio's mocked sign-in
    on_load = next(f.fn for f in demo.fns.values() if f.name == "on_load")
    profile = gr.OAuthProfile({"preferred_username": "alice", "name": "alice", "picture": "", "profile": ""})
    account, check, merge, _ = on_load(profile, gr.OAuthToken(token=app.GRADIO_MOCK_TOKEN, scope="", expires_at=0))
    if demo.server_name == "127.0.0.1":
        assert "Signed in as **alice**" in account and "this machine's own Hugging Face login" in account
        assert check.interactive and merge.interactive
        assert app.only_this_machine(demo)
        plan = client.predict(LLAMA_REPO, BASE_REPO, "", "", True, False, api_name="/check")  # alice's private base
        assert plan["inputs"][0]["source"] == BASE_REPO
        monkeypatch.setenv("SYSTEM", "spaces")
        assert not app.only_this_machine(demo)  # on a Space, never
        return
    assert "Not signed in" in account and "reachable from elsewhere" in account
    assert not check.interactive and not merge.interactive
    assert not app.only_this_machine(demo)
    with pytest.raises(AppError, match="reachable from elsewhere"):
        client.predict(LLAMA_REPO, BASE_REPO, "", "", True, False, api_name="/check")
    with pytest.raises(AppError, match="reachable from elsewhere"):
        client.predict(LLAMA_REPO, BASE_REPO, "", "leaked", False, False, api_name="/merge")  # public push
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=hub.tokens["alice"]).model_info("alice/leaked")
