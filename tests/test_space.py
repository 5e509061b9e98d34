"""The Gradio Space (space/app.py): launched in-process on 127.0.0.1 against the project's local Hub server, driven by
Playwright in Debian's Chromium, and called through gradio_client.

Sign-in is gradio's own mocked OAuth (what it mounts outside Spaces), with the user it signs in as and the token it
hands to the app replaced by the local Hub's user "alice" and her token: the app receives that token through
``gr.OAuthToken``, exactly as on a Space. Browser tests fail when Chromium is missing; they skip only when
HUBMERGE_SKIP_BROWSER_TESTS=1 says so (CI never sets it).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no version check, no telemetry
os.environ.setdefault("GRADIO_HEARTBEAT_INTERVAL", "1")  # closing a tab is noticed within a second

import pytest  # noqa: E402
from huggingface_hub import HfApi, hf_hub_download  # noqa: E402
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("HUBMERGE_CHROMIUM", "/usr/bin/chromium")
SKIP_BROWSER = "HUBMERGE_SKIP_BROWSER_TESTS"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
from support import ALPACA_REPO as ALPACA  # noqa: E402
from support import BASE_REPO as BASE  # noqa: E402
from support import LLAMA_REPO as LLAMA  # noqa: E402

TIMEOUT = 30_000  # ms, for anything the page waits on


def load_app():
    spec = importlib.util.spec_from_file_location("hubmerge_space_app", ROOT / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def space(tmp_path_factory, _published_hub):
    """The app on 127.0.0.1 with the session's local Hub (Plus adapters public under hfl, alice's base private);
    alice signs in."""
    import gradio.oauth
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("space")
    hub = _published_hub
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.delenv("SYSTEM", raising=False)  # not on a Space: gradio mounts its mocked OAuth routes
        tokens = hub.tokens
        local = {BASE: hub.local["base"], LLAMA: hub.local[LLAMA], ALPACA: hub.local[ALPACA]}

        # gradio's mocked OAuth, signed in as the local Hub's alice and handing the app her token
        mocked_info = gradio.oauth._get_mocked_oauth_info
        mp.setattr(gradio.oauth, "get_token", lambda: tokens["alice"])
        mp.setattr(gradio.oauth, "whoami", lambda *a, **k: HfApi(endpoint=hub.url).whoami(token=tokens["alice"]))
        mp.setattr(
            gradio.oauth, "_get_mocked_oauth_info", lambda: {**mocked_info(), "access_token": gradio.oauth.get_token()}
        )

        app = load_app()
        stages: list[str] = []
        slow = threading.Event()
        hold: dict[str, tuple[threading.Event, threading.Event]] = {}

        def on_stage(stage: str) -> None:
            """Record the stages; when asked, show each one long enough to be seen, or stop at one until released."""
            stages.append(stage)
            if slow.is_set() and stages.count(stage) == 1:
                time.sleep(0.4)
            if stage in hold:
                reached, release = hold.pop(stage)
                reached.set()
                release.wait(60)

        settings = app.Settings(endpoint=hub.url, workdir=root / "jobs", allow_local_paths=True, on_stage=on_stage)
        demo = app.create_app(settings)
        _, url, _ = demo.launch(
            server_name="127.0.0.1",
            server_port=free_port(),
            prevent_thread_lock=True,
            quiet=True,
            share=False,
            **app.LAUNCH,
        )
        try:
            yield SimpleNamespace(
                hub=hub,
                url=url.rstrip("/"),
                app=app,
                settings=settings,
                tokens=tokens,
                local=local,
                stages=stages,
                slow=slow,
                hold=hold,
                root=root,
            )
        finally:
            demo.close()


@pytest.fixture(scope="module")
def browser():
    if os.environ.get(SKIP_BROWSER) == "1":
        pytest.skip(f"{SKIP_BROWSER}=1: browser tests skipped on request")
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium), or set "
            f"{SKIP_BROWSER}=1 to skip the browser tests deliberately"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT)
    pg = context.new_page()
    yield pg
    context.close()


def open_page(page, space, *, sign_in: bool | None):
    """Open the app and wait for its load event; sign in first if asked (None: the browser is signed in already)."""
    page.goto(space.url)
    if sign_in:
        page.get_by_role("button", name="Sign in with Hugging Face").click()  # the name also holds the logo's alt
    if sign_in is False:  # the load event has run once the target's placeholder names no user
        page.locator("#target [placeholder='<you>/...']").wait_for()
    else:
        page.get_by_role("button", name="Logout (alice)").wait_for()
        page.locator("#target [placeholder^='alice/']").wait_for()
    return page


def fill(page, adapters: str, base: str = BASE):
    box = page.locator("#adapters textarea")
    box.fill("")
    box.press_sequentially(adapters)  # typed, as a user does (fill() sends no key events: no gradio "input" event)
    page.locator("#base textarea, #base input").first.fill(base)


def button(page, name: str):
    return page.get_by_role("button", name=name, exact=True)


def toast_text(page) -> str:
    toast = page.locator("[data-testid=toast-text]").last
    toast.wait_for()
    return toast.inner_text().strip()


def close_toasts(page):
    for close in page.locator("[data-testid=toast-close]").all():
        close.click()
    # wait until they are gone, or the next toast_text() could read a closing toast's old message
    page.wait_for_function("document.querySelectorAll('[data-testid=toast-text]').length === 0")


def no_jobs_left(space) -> bool:
    jobs = space.settings.workdir
    return not jobs.exists() or not any(jobs.iterdir())


def test_signed_out_page_explains_and_disables_merge(space, page):
    open_page(page, space, sign_in=False)
    assert "Sign in with Hugging Face to merge" in page.locator("#account").inner_text()
    assert "private" in page.locator("#account").inner_text()
    assert page.get_by_role("button", name="Sign in with Hugging Face").is_enabled()
    assert button(page, "Merge and push").is_disabled()
    assert button(page, "Check").is_disabled()


def test_plus_recipe_check_merge_and_push(space, page, tmp_path):
    open_page(page, space, sign_in=True)
    assert "Signed in as alice" in page.locator("#account").inner_text()
    assert button(page, "Merge and push").is_enabled()

    # the preset fills the Plus order: LLaMA-Plus, then Alpaca-Plus
    page.get_by_label("Preset").click()
    page.get_by_role("option", name="Chinese-Alpaca-Plus-7B", exact=True).click()
    page.wait_for_function("() => document.querySelector('#adapters textarea').value.includes('alpaca')")
    assert page.locator("#adapters textarea").input_value().split() == [
        "ziqingyang/chinese-llama-plus-lora-7b",
        "ziqingyang/chinese-alpaca-plus-lora-7b",
    ]

    # the same recipe with the tiny adapters on the local Hub, and alice's private base
    fill(page, f"{LLAMA}\n{ALPACA}")
    page.wait_for_function("() => document.querySelector('#adapters textarea').value.includes('tiny')")
    assert page.get_by_label("Preset").input_value() == "(none)"  # typed by hand: no longer the preset
    button(page, "Check").click()
    plan = page.locator("#plan")
    plan.get_by_text("adapter 2:").wait_for()
    text = plan.inner_text()
    assert f"base: {BASE}@" in text and "to download" in text
    assert f"adapter 1: {LLAMA}@" in text and "vocab 296" in text and f"adapter 2: {ALPACA}@" in text
    assert "vocab 297" in text and "write: hf" in text

    page.evaluate("""() => {
        window.__progress = [];
        const seen = () => document.querySelectorAll('.progress-level-inner').forEach(e => {
            const t = e.textContent.replace(/\u00a0/g, ' ').trim();
            if (t && window.__progress[window.__progress.length - 1] !== t) window.__progress.push(t);
        });
        new MutationObserver(seen).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    space.stages.clear()
    space.slow.set()
    try:
        button(page, "Merge and push").click()
        page.locator("[data-testid=status-tracker] .progress-bar").first.wait_for()
        result = page.get_by_role("link", name="alice/alpaca-plus-tiny-merged", exact=True)
        result.wait_for()
    finally:
        space.slow.clear()
    assert result.get_attribute("href") == f"{space.hub.url}/alice/alpaca-plus-tiny-merged"
    assert space.stages[0] == "download" and set(space.stages) == {"download", "verify", "merge", "upload"}
    assert space.stages.index("merge") < space.stages.index("upload")
    shown = page.evaluate("() => window.__progress")
    for k, stage in enumerate(("download", "verify", "merge", "upload"), 1):
        assert any(f"stage {k}/4: {stage}" in t for t in shown), shown

    assert "(private)" in page.locator("#result-link").inner_text()
    assert "vocabulary: 297 tokens" in page.locator("#summary").inner_text()
    card = page.locator("#card")
    card.get_by_text("Files (SHA256)").wait_for()
    assert "Sources" in card.inner_text() and LLAMA in card.inner_text()
    sha = page.locator("#sha256").inner_text()

    # on the server: private, the right files and card, readable by alice, not anonymously (fresh caches)
    api = HfApi(endpoint=space.hub.url, token=space.tokens["alice"])
    info = api.model_info("alice/alpaca-plus-tiny-merged", files_metadata=True)
    assert info.private
    names = {s.rfilename for s in info.siblings}
    assert {"model.safetensors", "config.json", "tokenizer.model", "hubmerge.json", "README.md"} <= names
    readme = Path(
        hf_hub_download(
            "alice/alpaca-plus-tiny-merged",
            "README.md",
            endpoint=space.hub.url,
            token=space.tokens["alice"],
            cache_dir=tmp_path / "alice",
        )
    ).read_text()
    for s in info.siblings:
        if s.lfs:
            assert s.lfs.sha256 in readme and s.lfs.sha256 in sha
    assert "- hubmerge" in readme and f"{LLAMA}/tree/{space.hub.resolve(LLAMA)}" in readme
    with pytest.raises(RepositoryNotFoundError) as anon:
        hf_hub_download(
            "alice/alpaca-plus-tiny-merged",
            "config.json",
            endpoint=space.hub.url,
            token=False,
            cache_dir=tmp_path / "anonymous",
        )
    assert not isinstance(anon.value, GatedRepoError)
    assert no_jobs_left(space)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "space.png"), full_page=True)


def test_errors_show_the_cli_message_and_the_page_keeps_working(space, page):
    import hubmerge

    open_page(page, space, sign_in=True)
    # a bad adapter ID: the message the CLI prints, word for word
    with pytest.raises(hubmerge.HubmergeError) as want:
        hubmerge.preview(
            ["hfl/no-such-adapter"],
            BASE,
            token=space.tokens["alice"],
            endpoint=space.hub.url,
            cache_dir=space.root / "cli-cache",
        )
    fill(page, "hfl/no-such-adapter")
    button(page, "Check").click()
    assert toast_text(page) == str(want.value)
    close_toasts(page)

    # the Plus adapters the wrong way round: refused by the Check, and by Merge and push (nothing published)
    fill(page, f"{ALPACA}\n{LLAMA}")
    button(page, "Check").click()
    assert "reverse the order" in toast_text(page)
    close_toasts(page)
    page.locator("#target input, #target textarea").first.fill("reversed-merge")
    button(page, "Merge and push").click()
    assert "reverse the order" in toast_text(page)
    close_toasts(page)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=space.hub.url, token=space.tokens["alice"]).model_info("alice/reversed-merge")
    assert no_jobs_left(space)

    # still usable: the right order checks fine
    fill(page, f"{LLAMA}\n{ALPACA}")
    button(page, "Check").click()
    page.locator("#plan").get_by_text("adapter 2:").wait_for()
    assert f"adapter 1: {LLAMA}@" in page.locator("#plan").inner_text()


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_gradio_client_with_oauth_token_and_a_local_base_folder(space, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(space.url, oauth_token=space.tokens["alice"], verbose=False)
    plan = client.predict(f"{LLAMA}\n{ALPACA}", BASE, "", api_name="/check")
    assert f"adapter 2: {ALPACA}@" in plan and "vocab 297" in plan
    # a local base folder (allowed off Spaces), a bare repo name (goes under alice), bfloat16, public
    link, summary, card, table = client.predict(
        f"{LLAMA}\n{ALPACA}", str(space.local[BASE]), "bfloat16", "client-merge", False, False, api_name="/merge"
    )
    assert f"[alice/client-merge]({space.hub.url}/alice/client-merge) (public)" in link
    assert "dtype bfloat16" in summary and "## Files (SHA256)" in card
    api = HfApi(endpoint=space.hub.url, token=space.tokens["alice"])
    info = api.model_info("alice/client-merge", files_metadata=True)
    assert not info.private
    shas = {row[0]: row[1] for row in table["data"]}
    assert shas["model.safetensors"] == next(s.lfs.sha256 for s in info.siblings if s.rfilename == "model.safetensors")
    config = json.loads(
        Path(
            hf_hub_download(
                "alice/client-merge", "config.json", endpoint=space.hub.url, token=False, cache_dir=tmp_path / "anon"
            )
        ).read_text()
    )
    assert config["vocab_size"] == 297 and "bfloat16" in (config.get("dtype"), config.get("torch_dtype"))

    # no token: the endpoint says to sign in, and never falls back to a token of the server's
    with pytest.raises(AppError, match="Sign in with Hugging Face first"):
        Client(space.url, verbose=False).predict(LLAMA, BASE, "", api_name="/check")
    assert no_jobs_left(space)


def test_one_merge_at_a_time_and_closing_the_tab_stops_it(space, page):
    open_page(page, space, sign_in=True)
    fill(page, f"{LLAMA}\n{ALPACA}")
    page.locator("#target input, #target textarea").first.fill("abandoned")
    second = open_page(page.context.new_page(), space, sign_in=None)  # same browser: signed in too
    fill(second, LLAMA)
    second.locator("#target input, #target textarea").first.fill("queued")
    reached, release = threading.Event(), threading.Event()
    space.hold["verify"] = (reached, release)
    try:
        button(page, "Merge and push").click()
        assert reached.wait(30), "the merge never reached its first verification"
        [cancelled] = space.settings.cancelled.values()  # the running job's session
        button(second, "Merge and push").click()  # waits for the first: its place in the queue shows
        second.locator("[data-testid=status-tracker]").get_by_text("queue: 1/1").wait_for()
        page.close()  # the heartbeat stream ends: gradio runs the unload event for the session
        assert wait_until(cancelled.is_set), "gradio did not run the unload event"
    finally:
        release.set()
        space.hold.clear()
    second.get_by_role("link", name="alice/queued", exact=True).wait_for()  # then the second one runs
    assert wait_until(lambda: no_jobs_left(space)), list(space.settings.workdir.iterdir())
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=space.hub.url, token=space.tokens["alice"]).model_info("alice/abandoned")


def test_simultaneous_users_each_get_their_own_result(space, tmp_path):
    """Several clients at once, each signed in as a different user: the queue runs them one by one, every user gets
    the result of their own inputs in their own private repo, and no job's files outlive it."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    users = {"alice": space.tokens["alice"], "bob": space.tokens["bob"], "erin": space.hub.add_user("erin")}
    jobs = {  # user -> (adapters, base, dtype): different inputs, so different weights
        "alice": (f"{LLAMA}\n{ALPACA}", BASE, ""),
        "bob": (LLAMA, str(space.local[BASE]), ""),
        "erin": (ALPACA, str(space.local[BASE]), "bfloat16"),
    }

    def run(user: str):
        adapters, base, dtype = jobs[user]
        client = Client(space.url, oauth_token=users[user], verbose=False)
        return client.predict(adapters, base, dtype, "load-test", True, False, api_name="/merge")

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = dict(zip(jobs, pool.map(run, jobs)))
    digests = {}
    for user, (link, _summary, _card, table) in results.items():
        repo = f"{user}/load-test"
        assert f"[{repo}]({space.hub.url}/{repo}) (private)" in link, (user, link)
        info = HfApi(endpoint=space.hub.url, token=users[user]).model_info(repo, files_metadata=True)
        assert info.private
        recorded = {s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs}
        shas = {row[0]: row[1] for row in table["data"]}
        assert shas["model.safetensors"] == recorded["model.safetensors"]
        digests[user] = recorded["model.safetensors"]
        others = [u for u in users if u != user]
        for other in others:  # nobody else can read it
            with pytest.raises(RepositoryNotFoundError):
                HfApi(endpoint=space.hub.url, token=users[other]).model_info(repo)
    assert len(set(digests.values())) == len(jobs)
    assert "dtype bfloat16" in results["erin"][1] and ALPACA in results["erin"][1] and LLAMA not in results["erin"][1]
    assert wait_until(lambda: no_jobs_left(space)), list(space.settings.workdir.iterdir())


def test_tokens_never_reach_the_output_or_the_logs(space, capfd, caplog, monkeypatch):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    canary = space.hub.add_user("dave", token="hf_DAVEdaveDAVEdaveDAVE000000000000")
    client = Client(space.url, oauth_token=canary, verbose=False)
    link, *_ = client.predict(LLAMA, str(space.local[BASE]), "", "", True, False, api_name="/merge")
    assert "dave/llama-plus-tiny-merged" in link
    with pytest.raises(AppError, match="hfl/no-such-adapter"):
        client.predict("hfl/no-such-adapter", str(space.local[BASE]), "", api_name="/check")

    def broken(*args, token=None, **kwargs):
        raise RuntimeError(f"something went wrong with {token}")

    monkeypatch.setattr(space.app.hubmerge, "preview", broken)
    with pytest.raises(AppError, match=r"unexpected error \(RuntimeError\)") as err:
        client.predict(LLAMA, BASE, "", api_name="/check")
    assert canary not in str(err.value)
    card = HfApi(endpoint=space.hub.url, token=canary).model_info("dave/llama-plus-tiny-merged").card_data
    out, errout = capfd.readouterr()
    assert "something went wrong with <token>" in caplog.text  # the bug is logged, the token scrubbed
    assert canary not in out + errout + caplog.text and canary not in str(card)
    assert no_jobs_left(space)


# ---------------------------------------------------------------------------------------------------------------------
# Without a server: stage labels, rules, presets, the Space's files and its deployment


def test_stage_labels_follow_the_bars_hubmerge_and_the_hub_client_open(space):
    class Recorder:  # stands in for gr.Progress: what the page would be sent
        def __init__(self):
            self.iterables, self.bars = [], []

        def tqdm(self, iterable, desc=None, total=None, unit="steps", _tqdm=None):
            self.bars.append(desc)

        def update(self, n=1):
            pass

        def close(self, _tqdm):
            pass

    progress, cancelled = Recorder(), threading.Event()
    stages = space.app.StageProgress(progress, cancelled)
    stage = progress.iterables[0]
    shown = []

    def bar(desc):
        handle = object()
        progress.tqdm(None, desc, 100, "B", _tqdm=handle)
        shown.append((stage.desc, progress.bars[-1]))
        return handle

    progress.close(bar("(…)0446fb/adapter_model.safetensors"))  # the Hub client's download bar
    shown.append((stage.desc, None))
    progress.close(bar("verify model.safetensors"))  # hubmerge's SHA256 bar for big downloads
    progress.close(bar("merge"))  # hubmerge's merge bar
    shown.append((stage.desc, None))
    bar("Upload 2 LFS files")
    assert shown == [
        ("stage 1/4: download", "adapter_model.safetensors"),
        ("stage 2/4: verify adapter_model.safetensors (SHA256)", None),
        ("stage 2/4: verify model.safetensors (SHA256)", "bytes hashed"),
        ("stage 3/4: merge", "tensors written"),
        ("stage 4/4: upload (hashing the output first)", None),
        ("stage 4/4: upload", "Upload 2 LFS files"),
    ]
    assert stages.seen == ["download", "verify", "merge", "upload"]
    assert [stage.index, stage.length] == [3, 4]
    cancelled.set()  # the session ended: the next progress report stops the job
    with pytest.raises(space.app.JobCancelled):
        progress.update(1)
    stages.done()
    assert progress.iterables == []


def test_on_spaces_local_paths_are_refused_and_tokens_never_swapped(space, monkeypatch, tmp_path):
    import gradio as gr

    app = space.app
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.delenv("HUBMERGE_SPACE_LOCAL_PATHS", raising=False)
    settings = app.default_settings()
    assert not settings.allow_local_paths
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    for adapter, base in ((LLAMA, str(tmp_path)), ("org/name", BASE), (LLAMA, "../x/y"), ("~/x", BASE)):
        with pytest.raises(gr.Error, match="local folders cannot be used on the Space"):
            app.checked_inputs(adapter, base, settings)
    assert app.checked_inputs(f"{LLAMA}\n{ALPACA}@v1  # Plus", BASE, settings) == ([LLAMA, f"{ALPACA}@v1"], BASE)

    monkeypatch.setenv("HF_TOKEN", "hf_machineMACHINEmachine00000000000")
    mocked = gr.OAuthToken(token=app.GRADIO_MOCK_TOKEN, scope="", expires_at=0)
    with pytest.raises(gr.Error, match="reachable from elsewhere"):
        app.user_token(mocked)  # never the machine's token unless only this machine can reach the app
    monkeypatch.delenv("SYSTEM")
    # locally, on 127.0.0.1 alone, gradio's mock = this login (tests/test_trust_local.py launches both cases)
    assert app.user_token(mocked, machine_login=True) == "hf_machineMACHINEmachine00000000000"
    with pytest.raises(gr.Error, match="Sign in"):
        app.user_token(None)

    assert app.target_repo("", [LLAMA, f"{ALPACA}@v1"], lambda: "alice") == "alice/alpaca-plus-tiny-merged"
    assert app.target_repo("hfl/x", [LLAMA], lambda: pytest.fail("no need to ask")) == "hfl/x"
    with pytest.raises(gr.Error, match="not a valid repository name"):
        app.target_repo("a/b/c", [LLAMA], lambda: "alice")


def test_presets_follow_the_recipes_and_name_known_adapters(space):
    from hubmerge.verification.known import known_hashes

    known = {repo: entry["name"] for entry in known_hashes()["adapters"] for repo in entry["repos"]}
    presets = space.app.PRESETS
    assert presets["Chinese-Alpaca-Plus-7B"] == [
        "ziqingyang/chinese-llama-plus-lora-7b",
        "ziqingyang/chinese-alpaca-plus-lora-7b",
    ]
    for name, ids in presets.items():
        assert [known[i] for i in ids][-1] == name  # the last adapter is the model the preset is named after
        if "Alpaca-Plus" in name or "Alpaca-Pro" in name:
            assert len(ids) == 2 and known[ids[0]] == name.replace("Alpaca-Pro", "LLaMA-Plus").replace(
                "Alpaca-Plus", "LLaMA-Plus"
            )


def test_space_front_matter_requirements_and_deploy(space, tmp_path):
    import gradio
    import torch
    from huggingface_hub.repocard import metadata_load

    meta = metadata_load(ROOT / "space" / "README.md")
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__ and meta["app_file"] == "app.py"
    assert meta["hf_oauth"] is True and {"read-repos", "write-repos", "manage-repos"} <= set(meta["hf_oauth_scopes"])
    assert str(meta["python_version"]) == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert len(meta["short_description"]) <= 60

    lines = [ln.strip() for ln in (ROOT / "space" / "requirements.txt").read_text().splitlines()]
    pins = dict(ln.split("==", 1) for ln in lines if "==" in ln and not ln.startswith("#"))
    assert pins["gradio[oauth]"] == gradio.__version__ and pins["torch"] == torch.__version__
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    names = {p.split("[")[0].lower().replace("-", "_") for p in pins}
    for dep in importlib.metadata.requires("hubmerge"):
        if "extra ==" in dep:
            continue
        name = re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0].lower().replace("-", "_")
        assert name in names, f"space/requirements.txt lacks hubmerge's dependency {dep}"

    spec = importlib.util.spec_from_file_location("hubmerge_space_deploy", ROOT / "space" / "deploy.py")
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    folder = deploy.assemble(tmp_path / "space")
    assert not list(folder.rglob("__pycache__"))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import hubmerge, hubmerge.verification.known as v; v.known_hashes(); print(hubmerge.__file__)",
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == (folder / "hubmerge" / "__init__.py").resolve()

    deploy.upload(folder, "alice/hubmerge", endpoint=space.hub.url, token=space.tokens["alice"])
    files = HfApi(endpoint=space.hub.url, token=space.tokens["alice"]).list_repo_files(
        "alice/hubmerge", repo_type="space"
    )
    assert {
        "app.py",
        "README.md",
        "requirements.txt",
        "hubmerge/__init__.py",
        "hubmerge/data/known_hashes.json",
    } <= set(files)
