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

    from hubmerge.testing.localhub import LocalHub

    root = tmp_path_factory.mktemp("space")
    hub = _published_hub
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.delenv("SYSTEM", raising=False)  # not on a Space: gradio mounts its mocked OAuth routes
        tokens = hub.tokens
        local = {BASE: hub.local["base"], LLAMA: hub.local[LLAMA], ALPACA: hub.local[ALPACA]}

        # gradio's mocked OAuth, signed in as the local Hub's alice and handing the app her token; the app's own
        # check for a machine login asks the same Hub with the same token
        mocked_info = gradio.oauth._get_mocked_oauth_info
        mp.setattr(gradio.oauth, "get_token", lambda: tokens["alice"])
        mp.setattr(gradio.oauth, "whoami", lambda *a, **k: HfApi(endpoint=hub.url).whoami(token=tokens["alice"]))
        mp.setattr(
            gradio.oauth, "_get_mocked_oauth_info", lambda: {**mocked_info(), "access_token": gradio.oauth.get_token()}
        )
        mp.setenv("HF_TOKEN", tokens["alice"])

        app = load_app()
        events: list = []
        hold: dict[str, tuple[threading.Event, threading.Event, int]] = {}

        def on_event(event) -> None:
            """Record the progress events; when asked, stop at a stage until released (at its first event, or once
            ``n`` of its tasks have finished)."""
            events.append(event)
            if event.stage in hold:
                reached, release, n = hold[event.stage]
                if sum(e.finished for e in events if e.stage == event.stage) >= n:
                    del hold[event.stage]
                    reached.set()
                    release.wait(60)

        def launch(endpoint: str):
            settings = app.Settings(
                endpoint=endpoint, workdir=root / "jobs", allow_local_paths=True, on_event=on_event, refresh_seconds=0.2
            )
            demo = app.create_app(settings)
            _, url, _ = demo.launch(
                server_name="127.0.0.1",
                server_port=free_port(),
                prevent_thread_lock=True,
                quiet=True,
                share=False,
                **app.LAUNCH,
            )
            return demo, url.rstrip("/"), settings

        # the same Hub (same storage) behind a link of 150 kB/s each way: a merge takes seconds, as a real one does
        throttled = LocalHub(hub.root, bandwidth=150_000).start()
        demo, url, settings = launch(hub.url)
        slow_demo, slow_url, _ = launch(throttled.url)
        try:
            yield SimpleNamespace(
                hub=hub,
                url=url,
                slow_url=slow_url,
                slow_hub=throttled,
                app=app,
                settings=settings,
                tokens=tokens,
                local=local,
                events=events,
                hold=hold,
                root=root,
            )
        finally:
            demo.close()
            slow_demo.close()
            throttled.stop()


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


def shot(page, name: str, locator=None) -> Path:
    """Save a screenshot of the page (or of one element) as a test artifact."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    (locator or page).screenshot(path=str(path), **({} if locator else {"full_page": True}))
    return path


def open_page(page, space, *, sign_in: bool | None, url: str | None = None):
    """Open the app (at ``url``, default the unthrottled one) and wait for its load event; sign in first if asked
    (None: the browser is signed in already)."""
    page.goto(url or space.url)
    if sign_in:
        page.get_by_role("button", name="Sign in with Hugging Face").click()  # the name also holds the logo's alt
    if sign_in is False:  # the load event has run once the target's placeholder names no user
        page.locator("#target [placeholder='<you>/...']").wait_for()
    else:
        page.get_by_role("button", name="Logout (alice)").wait_for()
        page.locator("#target [placeholder^='alice/']").wait_for()
    return page


def fill(page, adapters: str, base: str = BASE, target: str | None = None):
    box = page.locator("#adapters textarea")
    box.fill("")
    box.press_sequentially(adapters)  # typed, as a user does (fill() sends no key events: no gradio "input" event)
    page.locator("#base textarea, #base input").first.fill(base)
    if target is not None:
        page.locator("#target input, #target textarea").first.fill(target)


def button(page, name: str):
    return page.get_by_role("button", name=name, exact=True)


def visible(page, selector: str) -> bool:
    """Shown and taking room on the page (gradio hides components with a class, keeping them in the DOM)."""
    return page.evaluate(
        """s => { const e = document.querySelector(s);
                  if (!e) return false; const r = e.getBoundingClientRect();
                  return r.height > 0 && getComputedStyle(e).visibility !== 'hidden'; }""",
        selector,
    )


def wait_shown(page, selector: str, timeout: float = TIMEOUT / 1000) -> None:
    assert wait_until(lambda: visible(page, selector), timeout), f"{selector} never showed"


def table_cells(page, selector: str) -> list[list[str]]:
    return page.evaluate(
        """s => [...document.querySelectorAll(s + ' tr')].map(
                 tr => [...tr.children].map(c => c.innerText.replace(/\\u00a0/g, ' ').trim()))""",
        selector,
    )


def broken_cells(page, selector: str) -> list[str]:
    """Table cells under ``selector`` whose text the browser laid out on more than one line."""
    return page.evaluate(
        """s => [...document.querySelectorAll(s + ' th, ' + s + ' td')].filter(c => {
                 const walk = document.createTreeWalker(c, NodeFilter.SHOW_TEXT);
                 for (let t = walk.nextNode(); t; t = walk.nextNode()) {
                   if (!t.textContent.trim()) continue;
                   const r = document.createRange(); r.selectNodeContents(t);
                   if (r.getClientRects().length > 1) return true;  // one text laid out on several lines
                 }
                 return false;
               }).map(c => c.innerText)""",
        selector,
    )


def no_jobs_left(space) -> bool:
    jobs = space.settings.workdir
    return not jobs.exists() or not any(jobs.iterdir())


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_signed_out_page_explains_and_shows_no_empty_results(space, page):
    open_page(page, space, sign_in=False)
    assert "Sign in with Hugging Face to merge" in page.locator("#account").inner_text()
    assert "private" in page.locator("#account").inner_text()
    assert page.get_by_role("button", name="Sign in with Hugging Face").is_enabled()
    assert button(page, "Merge and push").is_disabled()
    assert button(page, "Check").is_disabled()
    # before anything ran: no card, no SHA256 table, no plan, progress or error panel
    for selector in ("#card", "#sha256", "#result", "#plan", "#error", "#reproduce"):
        assert not visible(page, selector), selector
    assert page.locator("#progress").inner_text().startswith("No job running")
    shot(page, "signed-out")


def test_plus_recipe_check_table_progress_panel_and_result(space, page, tmp_path):
    from hubmerge.output.recipe import reproduce_command

    open_page(page, space, sign_in=True, url=space.slow_url)  # the Space of the throttled Hub
    assert "Signed in as alice" in page.locator("#account").inner_text()

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
    wait_shown(page, "#plan")
    commits = {repo: space.hub.resolve(repo) for repo in (BASE, LLAMA, ALPACA)}
    header, *rows = table_cells(page, "#plan .hm-inputs")
    assert header == ["step", "source", "revision", "r", "alpha", "scale", "vocabulary", "download"]
    assert [r[:3] for r in rows] == [
        ["base", BASE, commits[BASE][:12]],
        ["1", LLAMA, commits[LLAMA][:12]],
        ["2", ALPACA, commits[ALPACA][:12]],
    ]
    assert rows[0][3:6] == ["–", "–", "–"] and rows[0][6].isdigit()  # the base: no r, alpha, scale
    assert rows[1][3:7] == ["8", "32", "4", "296"] and rows[2][3:7] == ["16", "32", "2", "297"]
    assert all(re.fullmatch(r"[\d.]+ [kMG]?B \(\d+ files?\)", r[7]) for r in rows), rows
    header, output = table_cells(page, "#plan .hm-output")
    assert header == ["dtype", "vocabulary", "shards", "disk"]
    assert output[1:3] == ["297", "1"] and "free" in output[3]
    assert "alice/alpaca-plus-tiny-merged" in page.locator("#plan .hm-ok").inner_text()
    assert not broken_cells(page, "#plan")
    shot(page, "check-plan")

    # Merge and push over the throttled link: the progress panel stays on screen, its text changing, start to finish
    page.evaluate("""() => {
        window.__samples = [];
        window.__sampler = setInterval(() => {
            const e = document.querySelector('#progress .hm-progress');
            if (!e) return;
            const r = e.getBoundingClientRect();
            window.__samples.push({h: r.height, t: e.innerText.replace(/\\u00a0/g, ' ')});
        }, 100);
    }""")
    space.events.clear()
    downloading, go_on = threading.Event(), threading.Event()
    space.hold["download"] = (downloading, go_on, 1)  # mid-download: the first adapter done, the rest to come
    reached, release = threading.Event(), threading.Event()
    space.hold["upload"] = (reached, release, 0)
    try:
        button(page, "Merge and push").click()
        page.locator("#progress .hm-progress").wait_for()
        assert not visible(page, "#plan")  # the new step cleared the plan of the previous one
        assert downloading.wait(60), "the merge never downloaded a file"
        time.sleep(3 * space.settings.refresh_seconds)
        numbers = page.locator("#progress [data-stage=download] .hm-stage-nums").inner_text()
        assert re.fullmatch(r"[\d.]+ kB of [\d.]+ kB · 1 file done · [\d.]+ kB/s · about \d+:\d\d left", numbers), (
            numbers
        )
        shot(page, "progress-download", page.locator("#progress"))
        go_on.set()
        assert reached.wait(60), "the merge never reached its upload"
        page.locator("#progress [data-stage=upload].is-running").wait_for()
        shot(page, "progress-panel", page.locator("#progress"))
        shot(page, "progress")
        release.set()
        result = page.get_by_role("link", name="alice/alpaca-plus-tiny-merged", exact=True)
        result.wait_for()
    finally:
        go_on.set()
        release.set()
        space.hold.clear()
    samples = page.evaluate("() => { clearInterval(window.__sampler); return window.__samples; }")
    shown = [s for s in samples if s["t"].strip()]
    assert shown and all(s["h"] > 40 for s in shown), samples[:5]
    texts = [s["t"] for s in shown]
    assert len(set(texts)) >= 5, texts  # it moves
    for label in ("Download", "Verify", "Merge", "Upload"):
        assert any(label in t for t in texts)
    assert any(re.search(r"\d+(\.\d)? [kM]?B of \d+(\.\d)? [kM]?B", t) for t in texts), texts
    assert any(re.search(r"[kM]?B/s", t) for t in texts)
    assert {e.stage for e in space.events} == {"download", "verify", "merge", "upload"}
    downloaded = {e.name for e in space.events if e.stage == "download"}
    assert downloaded <= {e.name for e in space.events if e.stage == "verify" and e.finished}  # each one checked
    # the finished panel: every stage done, with its total
    assert page.locator("#progress .hm-stage.is-done").count() == 4
    assert result.get_attribute("href") == f"{space.slow_hub.url}/alice/alpaca-plus-tiny-merged"

    assert "(private)" in page.locator("#result-link").inner_text()
    assert "vocabulary: 297 tokens" in page.locator("#summary").inner_text()
    assert "2 adapters applied in order" in page.locator("#summary").inner_text()
    card = page.locator("#card")
    card.get_by_text("Files (SHA256)").wait_for()
    assert "Sources" in card.inner_text() and LLAMA in card.inner_text()
    headers = [c.strip() for c in card.locator("th").all_inner_texts()]
    assert {"layout", "r", "alpha", "scale", "replaces", "vocab"} <= set(headers)
    assert not broken_cells(page, "#card")  # no "layou t", no "1 6"
    sha = page.locator("#sha256").inner_text()
    command = page.locator("#reproduce .cm-content").inner_text()
    pinned = f"hubmerge {LLAMA}@{commits[LLAMA]} {ALPACA}@{commits[ALPACA]} --base {BASE}@{commits[BASE]}"
    assert pinned in command, command

    # on the server: private, the right files and card, readable by alice, not anonymously (fresh caches)
    api = HfApi(endpoint=space.hub.url, token=space.tokens["alice"])
    info = api.model_info("alice/alpaca-plus-tiny-merged", files_metadata=True)
    assert info.private
    names = {s.rfilename for s in info.siblings}
    assert {"model.safetensors", "config.json", "tokenizer.model", "hubmerge.json", "README.md"} <= names

    def download(name: str, **kw) -> Path:
        return Path(hf_hub_download("alice/alpaca-plus-tiny-merged", name, endpoint=space.hub.url, **kw))

    readme = download("README.md", token=space.tokens["alice"], cache_dir=tmp_path / "alice").read_text()
    for s in info.siblings:
        if s.lfs:
            assert s.lfs.sha256 in readme and s.lfs.sha256 in sha
    assert "- hubmerge" in readme and f"{LLAMA}/tree/{commits[LLAMA]}" in readme
    assert "2 LoRA adapters merged" in readme and "adapter(s)" not in readme
    recipe = json.loads(
        download("hubmerge.json", token=space.tokens["alice"], cache_dir=tmp_path / "alice").read_text()
    )
    assert recipe["command"] == command.strip()
    assert reproduce_command(recipe, wrapped=True) in readme  # the card's copy, one input a line
    with pytest.raises(RepositoryNotFoundError) as anon:
        download("config.json", token=False, cache_dir=tmp_path / "anonymous")
    assert not isinstance(anon.value, GatedRepoError)
    assert no_jobs_left(space)

    # "Recent merges" found it through the Hub (tag hubmerge), with its sources in order
    page.locator("#recent-panel").get_by_text("Recent merges").click()
    recent = page.locator("#recent")
    recent.get_by_role("link", name="alice/alpaca-plus-tiny-merged", exact=True).wait_for()
    row = next(r for r in table_cells(page, "#recent") if r[0] == "alice/alpaca-plus-tiny-merged")
    assert row[2].split() == [BASE, LLAMA, ALPACA] and row[3] == "private" and re.match(r"\d{4}-\d\d-\d\d", row[1])
    shot(page, "space")

    # the next step starts clean: Check again, and the published result and the finished panel give way to the plan
    button(page, "Check").click()
    wait_shown(page, "#plan")
    assert not visible(page, "#result") and not visible(page, "#card") and not visible(page, "#sha256")
    assert page.locator("#progress .hm-stage").count() == 0


def test_errors_stay_on_the_page_clear_stale_results_and_speak_the_page(space, page):
    import hubmerge

    open_page(page, space, sign_in=True)
    fill(page, f"{LLAMA}\n{ALPACA}")
    button(page, "Check").click()
    wait_shown(page, "#plan")

    # a bad adapter ID: the message the CLI prints, word for word, in the error panel; the old plan is gone
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
    wait_shown(page, "#error")
    assert not visible(page, "#plan")
    message = space.app.page_wording(str(want.value))  # the CLI's words, with the page's controls for the CLI's
    assert "hf auth login" in str(want.value) and "sign in again" in message and "--token" not in message
    assert message in page.locator("#error").inner_text()
    time.sleep(11)  # longer than a toast lives: the panel stays
    assert visible(page, "#error") and message in page.locator("#error").inner_text()
    shot(page, "error")

    # the Plus adapters the wrong way round: refused by Merge and push (nothing published, no repo left)
    fill(page, f"{ALPACA}\n{LLAMA}", target="reversed-merge")
    button(page, "Merge and push").click()
    page.locator("#error").get_by_text("reverse the order").wait_for()
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=space.hub.url, token=space.tokens["alice"]).model_info("alice/reversed-merge")

    # a repository that has files: the Check warns, Merge refuses, both naming the page's checkbox
    api = HfApi(endpoint=space.hub.url, token=space.tokens["alice"])
    api.create_repo("alice/taken", private=True, exist_ok=True)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="notes.txt", repo_id="alice/taken")
    fill(page, f"{LLAMA}\n{ALPACA}", target="taken")
    button(page, "Check").click()
    wait_shown(page, "#plan")
    assert not visible(page, "#error")  # the new step cleared the old error
    warning = page.locator("#plan .hm-warning").inner_text()
    assert "alice/taken" in warning and f"tick '{space.app.OVERWRITE_LABEL}'" in warning, warning
    assert "--overwrite" not in warning
    button(page, "Merge and push").click()
    wait_shown(page, "#error")
    message = page.locator("#error").inner_text()
    assert f"tick '{space.app.OVERWRITE_LABEL}'" in message and "--overwrite" not in message
    assert page.locator("#error .hm-hint").inner_text() == space.app.PAGE_HINTS["overwrite"]  # by the error's remedy
    assert api.list_repo_files("alice/taken") == [".gitattributes", "notes.txt"] or set(
        api.list_repo_files("alice/taken")
    ) <= {".gitattributes", "notes.txt"}

    # a namespace alice cannot write to: the Check says so before anything runs
    fill(page, f"{LLAMA}\n{ALPACA}", target="hfl/not-yours")
    button(page, "Check").click()
    wait_shown(page, "#plan")
    assert "hfl/not-yours" in page.locator("#plan .hm-warning").inner_text()
    assert no_jobs_left(space)


def test_gradio_client_with_oauth_token_and_a_local_base_folder(space, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(space.url, oauth_token=space.tokens["alice"], verbose=False)
    plan = client.predict(f"{LLAMA}\n{ALPACA}", BASE, "", "client-merge", True, False, api_name="/check")
    assert [(i["role"], i["source"], i["vocab"]) for i in plan["inputs"]][1:] == [
        ("adapter", LLAMA, 296),
        ("adapter", ALPACA, 297),
    ]
    assert plan["output"]["vocab"] == 297 and plan["target"]["ok"] and plan["target"]["repo_id"] == "alice/client-merge"
    # a local base folder (allowed off Spaces), a bare repo name (goes under alice), bfloat16, public
    done = client.predict(
        f"{LLAMA}\n{ALPACA}", str(space.local[BASE]), "bfloat16", "client-merge", False, False, api_name="/merge"
    )
    assert done["repo_id"] == "alice/client-merge" and done["url"] == f"{space.hub.url}/alice/client-merge"
    assert not done["private"] and "## Files (SHA256)" in done["card"]
    assert "--dtype bfloat16" in done["command"] and str(space.local[BASE]) in done["command"]
    api = HfApi(endpoint=space.hub.url, token=space.tokens["alice"])
    info = api.model_info("alice/client-merge", files_metadata=True)
    assert not info.private
    assert done["files"]["model.safetensors"] == next(
        s.lfs.sha256 for s in info.siblings if s.rfilename == "model.safetensors"
    )
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
        Client(space.url, verbose=False).predict(LLAMA, BASE, "", "", True, False, api_name="/check")
    assert no_jobs_left(space)


def test_one_merge_at_a_time_and_closing_the_tab_leaves_no_repo(space, page):
    open_page(page, space, sign_in=True)
    fill(page, f"{LLAMA}\n{ALPACA}", target="abandoned")
    second = open_page(page.context.new_page(), space, sign_in=None)  # same browser: signed in too
    fill(second, LLAMA, target="queued")
    reached, release = threading.Event(), threading.Event()
    space.hold["upload"] = (reached, release, 0)  # the repository exists by then; nothing is committed yet
    try:
        button(page, "Merge and push").click()
        assert reached.wait(60), "the merge never reached its upload"
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
    with pytest.raises(RepositoryNotFoundError):  # the cancelled job removed the repository it had created
        HfApi(endpoint=space.hub.url, token=space.tokens["alice"]).model_info("alice/abandoned")


def test_phone_width_viewport(space, browser):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    context.set_default_timeout(TIMEOUT)
    try:
        page = open_page(context.new_page(), space, sign_in=True)
        fill(page, f"{LLAMA}\n{ALPACA}")
        button(page, "Check").click()
        wait_shown(page, "#plan")
        # nothing wider than the screen but the tables, which scroll inside their own box
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
        for name in ("Check", "Merge and push"):
            box = button(page, name).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["height"] >= 30
        assert page.evaluate("() => document.querySelector('#plan .hm-scroll').clientWidth") <= 390
        shot(page, "narrow")
        # the whole job at that width: the panel, the result, the card's wide tables scrolling in their own box
        page.locator("#target input, #target textarea").first.fill("phone-merge")
        button(page, "Merge and push").click()
        page.get_by_role("link", name="alice/phone-merge", exact=True).wait_for()
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
        assert page.locator("#progress .hm-stage.is-done").count() == 4
        assert not broken_cells(page, "#card")
        shot(page, "narrow-result")
    finally:
        context.close()


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
    for user, done in results.items():
        repo = f"{user}/load-test"
        assert done["repo_id"] == repo and done["private"], (user, done["repo_id"])
        info = HfApi(endpoint=space.hub.url, token=users[user]).model_info(repo, files_metadata=True)
        assert info.private
        recorded = {s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs}
        assert done["files"]["model.safetensors"] == recorded["model.safetensors"]
        digests[user] = recorded["model.safetensors"]
        for other in (u for u in users if u != user):  # nobody else can read it
            with pytest.raises(RepositoryNotFoundError):
                HfApi(endpoint=space.hub.url, token=users[other]).model_info(repo)
    assert len(set(digests.values())) == len(jobs)
    erin = results["erin"]
    assert "--dtype bfloat16" in erin["command"] and ALPACA in erin["command"] and LLAMA not in erin["command"]
    assert wait_until(lambda: no_jobs_left(space)), list(space.settings.workdir.iterdir())


def test_tokens_never_reach_the_output_or_the_logs(space, capfd, caplog, monkeypatch):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    canary = space.hub.add_user("dave", token="hf_DAVEdaveDAVEdaveDAVE000000000000")
    client = Client(space.url, oauth_token=canary, verbose=False)
    done = client.predict(LLAMA, str(space.local[BASE]), "", "", True, False, api_name="/merge")
    assert done["repo_id"] == "dave/llama-plus-tiny-merged"
    with pytest.raises(AppError, match="hfl/no-such-adapter"):
        client.predict("hfl/no-such-adapter", str(space.local[BASE]), "", "", True, False, api_name="/check")

    def broken(*args, token=None, **kwargs):
        raise RuntimeError(f"something went wrong with {token}")

    monkeypatch.setattr(space.app, "plan_preview", broken)
    with pytest.raises(AppError, match=r"unexpected error \(RuntimeError\)") as err:
        client.predict(LLAMA, BASE, "", "", True, False, api_name="/check")
    assert canary not in str(err.value)
    card = HfApi(endpoint=space.hub.url, token=canary).model_info("dave/llama-plus-tiny-merged").card_data
    out, errout = capfd.readouterr()
    assert "something went wrong with <token>" in caplog.text  # the bug is logged, the token scrubbed
    assert canary not in out + errout + caplog.text and canary not in str(card)
    assert no_jobs_left(space)


def test_started_without_a_login_the_page_says_how(space, tmp_path):
    """``python space/app.py`` on a machine with no Hub login starts, without a sign-in button, and says how to get
    one; pointed at another Hub with HF_ENDPOINT and HF_TOKEN it offers the sign-in button again."""
    import urllib.request

    def start(env_extra: dict[str, str]) -> str:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GRADIO_", "SYSTEM"))}
        env.update(
            HF_HOME=str(tmp_path / "hf-home"),
            GRADIO_ANALYTICS_ENABLED="False",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_XET="1",
            GRADIO_SERVER_NAME="127.0.0.1",
            GRADIO_SERVER_PORT=str(port),
            HUBMERGE_SPACE_WORKDIR=str(tmp_path / "jobs"),
            **env_extra,
        )
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "space" / "app.py")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as r:
                        return r.read().decode()
                except OSError:
                    time.sleep(0.5)
            pytest.fail("the app did not start within 120 s")
        finally:
            proc.terminate()
            proc.wait(30)
            proc.stdout.close()

    config = start({"HF_ENDPOINT": space.hub.url})
    assert "No Hugging Face login on this machine" in config and "hf auth login" in config
    button = '"value":"Sign in with Hugging Face"'  # the login button, as the page's config describes it
    assert "HF_ENDPOINT" in config and button not in config
    config = start({"HF_ENDPOINT": space.hub.url, "HF_TOKEN": space.tokens["bob"]})
    assert button in config and "No Hugging Face login" not in config


# ---------------------------------------------------------------------------------------------------------------------
# Without a server: stage labels, rules, presets, the Space's files and its deployment


def test_progress_panel_sums_each_stage_in_the_hubs_units(space):
    from hubmerge.progress import ProgressEvent

    now = [100.0]
    cancelled = threading.Event()
    progress = space.app.JobProgress("Merge and push", cancelled, clock=lambda: now[0])
    assert [progress.state(s) for s in progress.stages] == ["waiting"] * 4

    def event(stage, name, done, total, finished=False, at=None):
        if at is not None:
            now[0] = at
        progress(ProgressEvent(stage, name, done, total, finished=finished))

    event("download", "adapter_model.safetensors", 0, 1_000_000, at=100.0)
    event("download", "adapter_model.safetensors", 1_000_000, 1_000_000, finished=True, at=101.0)
    event("download", "model.safetensors", 0, 3_000_000, at=101.0)
    event("download", "model.safetensors", 1_000_000, 3_000_000, at=102.0)
    assert progress.state("download") == "running"
    assert progress.numbers("download") == "2.0 MB of 4.0 MB · 1 of 2 files · 1.0 MB/s · about 0:02 left"
    html = progress.html()
    assert 'data-stage="download"' in html and "model.safetensors" in html and 'aria-valuenow="50"' in html
    event("download", "model.safetensors", 3_000_000, 3_000_000, finished=True, at=103.0)
    event("verify", "model.safetensors", 3_000_000, 3_000_000, finished=True, at=103.5)
    assert progress.state("download") == "done"  # finished, and a later stage began
    assert progress.numbers("download") == "4.0 MB of 4.0 MB · 2 files · 1.3 MB/s · took 0:03"
    event("merge", "out", 0, None, at=104.0)
    assert progress.numbers("merge") == "0 B"  # no total known yet: no share, no rate, no time left
    # a hostile file name is shown as text, never as markup
    event("upload", "<img src=x onerror=alert(1)>", 0, 10, at=105.0)
    assert "<img" not in progress.html() and "&lt;img" in progress.html()
    cancelled.set()  # the session ended: the next event stops the job
    with pytest.raises(space.app.JobCancelled):
        event("upload", "x", 1, 10)
    progress.finish()
    assert progress.state("merge") == "running"  # its task never finished

    # the download's size known up front (from the dry run): its bar ends there, not at the files begun so far
    ahead = space.app.JobProgress("Merge and push", clock=lambda: now[0])
    ahead.expect("download", 5_000_000)
    ahead(ProgressEvent("download", "a.safetensors", 0, 1_000_000))
    now[0] += 1
    ahead(ProgressEvent("download", "a.safetensors", 1_000_000, 1_000_000, finished=True))
    ahead(ProgressEvent("verify", "a.safetensors", 1_000_000, 1_000_000, finished=True))
    assert ahead.state("download") == "running"  # more to come, though a later stage began
    assert ahead.numbers("download") == "1.0 MB of 5.0 MB · 1 file done · 1.0 MB/s · about 0:04 left"


def test_page_wording_points_at_the_pages_controls(space):
    app = space.app
    assert app.page_wording(
        "alice/x: the repository already has 3 files; pass --overwrite to replace them, or choose another name"
    ) == (
        f"alice/x: the repository already has 3 files; tick '{app.OVERWRITE_LABEL}' to replace them, "
        "or choose another name"
    )
    assert (
        app.page_wording(
            "alice/x: the Hub rejected your token (401); log in (`hf auth login`, HF_TOKEN or --token) again with a "
            "valid token"
        )
        == "alice/x: the Hub rejected your token (401); sign in again with a valid token"
    )
    assert "--" not in app.page_wording("x: values overflow: try --dtype bfloat16")


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
        with pytest.raises(app.PageError, match="local folders cannot be used on the Space"):
            app.checked_inputs(adapter, base, settings)
    assert app.checked_inputs(f"{LLAMA}\n{ALPACA}@v1  # Plus", BASE, settings) == ([LLAMA, f"{ALPACA}@v1"], BASE)

    monkeypatch.setenv("HF_TOKEN", "hf_machineMACHINEmachine00000000000")
    mocked = gr.OAuthToken(token=app.GRADIO_MOCK_TOKEN, scope="", expires_at=0)
    with pytest.raises(app.PageError, match="reachable from elsewhere"):
        app.user_token(mocked)  # never the machine's token unless only this machine can reach the app
    monkeypatch.delenv("SYSTEM")
    # locally, on 127.0.0.1 alone, gradio's mock = this login (tests/test_trust_local.py launches both cases)
    assert app.user_token(mocked, machine_login=True) == "hf_machineMACHINEmachine00000000000"
    with pytest.raises(app.PageError, match="Sign in"):
        app.user_token(None)

    assert app.target_repo("", [LLAMA, f"{ALPACA}@v1"], lambda: "alice") == "alice/alpaca-plus-tiny-merged"
    assert app.target_repo("hfl/x", [LLAMA], lambda: pytest.fail("no need to ask")) == "hfl/x"
    with pytest.raises(app.PageError, match="not a valid repository name"):
        app.target_repo("a/b/c", [LLAMA], lambda: "alice")


def test_presets_follow_the_recipes_and_name_known_adapters(space):
    from hubmerge.verification.known import known_hashes

    known = {repo: entry["name"] for entry in known_hashes()["adapters"] for repo in entry["repos"]}
    presets = space.app.PRESETS
    assert presets["Chinese-Alpaca-Plus-7B"] == [
        "ziqingyang/chinese-llama-plus-lora-7b",
        "ziqingyang/chinese-alpaca-plus-lora-7b",
    ]
    second = {name: ids for name, ids in presets.items() if "-2-" in name}  # Chinese-LLaMA-Alpaca-2
    assert second["Chinese-Alpaca-2-7B-16K"] == ["hfl/chinese-alpaca-2-lora-7b-16k"]
    assert len(second) == 10 and all(len(ids) == 1 and ids[0].startswith("hfl/") for ids in second.values())
    for name, ids in presets.items():
        if name in second:
            continue  # the project publishes no file hashes for its second generation
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
