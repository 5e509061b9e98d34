"""The hubmerge Space: merge LoRA adapters from the Hub into the user's own base model and publish the result to a
private repo of theirs, signed in with Hugging Face.

This file is UI only. The work is done by hubmerge's public API: :func:`hubmerge.dryrun.plan_preview` (the Check
step: the plan the CLI's ``--dry-run`` prints, as data) and :func:`hubmerge.merge` with ``push_to`` (download, verify,
merge, upload), whose typed progress events (:class:`hubmerge.progress.ProgressEvent`) drive the progress panel.

Rules the page keeps:

- Every Hub call carries the signed-in user's OAuth token (``gr.OAuthToken``), passed explicitly: never a token of
  the Space's own (an ``HF_TOKEN`` secret of the Space is never used). Tokens are never logged, printed or written.
  Off Spaces, gradio's mocked login hands out a fixed placeholder token and signs in as this machine's own Hugging Face
  login. Anyone who can reach the app can send that placeholder, so the app lends this machine's login (``HF_TOKEN``
  or ``hf auth login``) for it only while nobody else can reach the app: listening on a loopback address alone, with
  no share link (:func:`only_this_machine`); the page says so. Otherwise the placeholder is refused and a real token
  is needed (Spaces' OAuth, or gradio_client's ``oauth_token``). Without a machine login the page starts anyway,
  without the sign-in button, and says how to get one.
- Each step clears what the previous one showed; progress, errors and results each have their own panel, which stays
  until the next step starts.
- One merge at a time (queue with a visible position); each job works in its own temporary folder (download cache
  and output), removed when the job ends, failed or not. When the user closes the tab, gradio runs the ``unload``
  event: a merge of that session still running stops at its next progress event and cleans up, including the
  repository it created if nothing was committed to it yet.
- Local folders as inputs are allowed only off Spaces (``HUBMERGE_SPACE_LOCAL_PATHS=1``/``0`` overrides): on a shared
  server a path could name another job's files.
- The page keeps no record of its own: "Recent merges" asks the Hub for the user's repos tagged ``hubmerge``.

Run locally: ``python space/app.py`` (see the README's "Gradio Space" section); ``HF_ENDPOINT`` picks the Hub.
"""

from __future__ import annotations

import contextlib
import html
import ipaddress
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

import hubmerge
from hubmerge import HubmergeError
from hubmerge.dryrun import Preview, plan_preview
from hubmerge.progress import STAGES, ProgressEvent
from hubmerge.sizes import format_size

log = logging.getLogger("hubmerge.space")

# Gradio's mocked OAuth (outside Spaces) gives every session this fixed token; see gradio.oauth._get_mocked_oauth_info.
GRADIO_MOCK_TOKEN = "mock-oauth-token-for-local-dev"
JOB_PREFIX = "hubmerge-job-"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
OVERWRITE_LABEL = "Replace the files if the repository already has some"
RECENT_LIMIT = 20


def _family(size: str) -> dict[str, list[str]]:
    llama, alpaca = "ziqingyang/chinese-llama-{}lora-" + size, "ziqingyang/chinese-alpaca-{}lora-" + size
    return {
        f"Chinese-LLaMA-{size.upper()}": [llama.format("")],
        f"Chinese-Alpaca-{size.upper()}": [alpaca.format("")],
        f"Chinese-LLaMA-Plus-{size.upper()}": [llama.format("plus-")],
        f"Chinese-Alpaca-Plus-{size.upper()}": [llama.format("plus-"), alpaca.format("plus-")],
        f"Chinese-Alpaca-Pro-{size.upper()}": [llama.format("plus-"), alpaca.format("pro-")],
    }


# The Chinese-LLaMA/Alpaca family, in the order each recipe applies its adapters to the original LLaMA (HF format):
# the Plus and Pro Alpacas are merged on top of LLaMA-Plus, never alone and never the other way round.
PRESETS: dict[str, list[str]] = {name: ids for size in ("7b", "13b", "33b") for name, ids in _family(size).items()}
# Chinese-LLaMA-Alpaca-2: one adapter each, on the matching Llama-2 base (HF format); the 16K and 64K long-context
# adapters carry their rope scaling in their own config.json, which hubmerge takes over.
PRESETS.update(
    {
        f"Chinese-{kind}-2-{size.upper()}{context.upper()}": [f"hfl/chinese-{kind.lower()}-2-lora-{size}{context}"]
        for kind in ("LLaMA", "Alpaca")
        for size, context in (("7b", ""), ("13b", ""), ("7b", "-16k"), ("13b", "-16k"), ("7b", "-64k"))
    }
)

DTYPES = [("the base's dtype", ""), ("float16", "float16"), ("bfloat16", "bfloat16"), ("float32", "float32")]

SIGNED_OUT = """\
**Sign in with Hugging Face to merge.** Signing in lets this page act as you, and only as you, on the Hub:
read the adapters and *your own* base model (also private ones: `read-repos`), create a repository in your
namespace (`manage-repos`) and push the merged model to it (`write-repos`). The new repository is private unless you
untick *Private*. The Space has no token of its own; signing out (or closing the tab) ends its access."""

NO_LOCAL_LOGIN = """\
**No Hugging Face login on this machine ({reason}), so there is no sign-in button.** Outside a Space the button
stands for this machine's own login. To merge, stop the app and either run `hf auth login` (or set `HF_TOKEN`),
or point it at another Hub with both `HF_ENDPOINT=<that Hub's URL>` and `HF_TOKEN=<a token of that Hub>`; then
start `python space/app.py` again. The Hub is now `{hub}`."""

MACHINE_LOGIN = (
    "The app listens on this machine only, so the sign-in button stands for this machine's own Hugging Face login "
    "(`HF_TOKEN` or `hf auth login`)."
)
MOCK_REFUSED = (
    "gradio's local sign-in stands for this machine's own Hugging Face login, which the app lends only while it "
    "listens on 127.0.0.1 alone (no share link); it is reachable from elsewhere now: run it on 127.0.0.1, or sign "
    "in with a real token (gradio_client's oauth_token)"
)

# What to do on the page, by the remedy a hubmerge error names (hubmerge.errors.Remedy); shown under the message.
DEFAULT_HINT = "Fix it above and start the step again."
PAGE_HINTS: dict[str, str] = {
    "overwrite": f"Tick '{OVERWRITE_LABEL}' to replace the files, or choose another name under 'Publish to'.",
    "login": "Sign out and in again with the button at the top, as an account that can read it.",
    "dtype": "Choose another Output dtype.",
    "format": "The Space writes the HF format only: merge this one locally with the command-line tool.",
    "no-verify": "The Space always verifies its inputs: merge this one locally with the command-line tool.",
}

# CLI wording in hubmerge's one-line messages -> what the page offers instead (applied in order, as data).
PAGE_WORDING: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"pass --overwrite to replace (them|it)"), f"tick '{OVERWRITE_LABEL}' to replace \\1"),
    (re.compile(r"--overwrite replaces them"), f"'{OVERWRITE_LABEL}' is ticked: they will be replaced"),
    (re.compile(r"(log in|login) \(`hf auth login`[^)]*\)( again)?"), "sign in again"),
    (re.compile(r"use a token with write access to that namespace"), "sign in again, or publish to your own namespace"),
    (re.compile(r"use --format hf|add hf to --format"), "the Space writes the HF format only"),
    (re.compile(r"try --dtype (\w+)"), "choose Output dtype \\1"),
]


@dataclass
class Settings:
    """Where the app's Hub calls go and where jobs put their files."""

    endpoint: str | None = None  # None: the client's default (HF_ENDPOINT, else huggingface.co)
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "hubmerge-space")
    allow_local_paths: bool = False
    # session hash -> set when that browser session ends (tab closed): its running job stops
    cancelled: dict[str, threading.Event] = field(default_factory=dict)
    on_event: Callable[[ProgressEvent], None] | None = None  # sees every progress event (tests: to hold or slow)
    refresh_seconds: float = 0.5  # how often a running job redraws its progress panel

    @property
    def hub_url(self) -> str:
        from huggingface_hub import constants

        return (self.endpoint or constants.ENDPOINT).rstrip("/")


def on_spaces() -> bool:
    return os.environ.get("SYSTEM") == "spaces"


def only_this_machine(demo: gr.Blocks) -> bool:
    """Whether the running app is reachable from this machine only: off Spaces, every server it listens on (gradio's,
    and the Node front of SSR mode) bound to a loopback address, and no share link."""
    # gradio sets these attributes in launch(): before it, nothing is known and the answer is no.
    hosts = [getattr(demo, "server_name", None), getattr(demo, "node_server_name", None)]
    if on_spaces() or demo.share or hosts[0] is None:
        return False
    return all(host is None or _is_loopback(host) for host in hosts)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_settings() -> Settings:
    local = os.environ.get("HUBMERGE_SPACE_LOCAL_PATHS")
    return Settings(
        endpoint=os.environ.get("HF_ENDPOINT") or None,
        workdir=Path(os.environ.get("HUBMERGE_SPACE_WORKDIR") or Path(tempfile.gettempdir()) / "hubmerge-space"),
        allow_local_paths=(local == "1") if local in ("0", "1") else not on_spaces(),
    )


def local_login_problem(settings: Settings) -> str | None:
    """Off Spaces, gradio's sign-in button needs this machine's own Hub login (and refuses to start without one);
    None when there is one, else why not, in a few words. On a Space the real OAuth needs nothing local."""
    if on_spaces():
        return None
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        return "neither `hf auth login` nor HF_TOKEN"
    try:
        who = HfApi(endpoint=settings.endpoint, token=token).whoami()
    except Exception as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return f"the Hub did not accept its token ({status or type(exc).__name__})"
    if who.get("type", "user") != "user":
        return "its token is not a personal user's"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


class JobCancelled(Exception):
    """The browser session that started the job has ended."""


class PageError(Exception):
    """A message for the page's error panel (and, through the API, the client's error); ``hint`` names the control
    on the page that fixes it."""

    def __init__(self, message: str, hint: str = DEFAULT_HINT):
        super().__init__(message)
        self.hint = hint


def user_token(oauth_token: gr.OAuthToken | None, machine_login: bool = False) -> str:
    """The signed-in user's token; a one-line error when nobody is signed in. gradio's mock token stands for this
    machine's own login only when ``machine_login`` (the app is reachable from this machine only, see
    :func:`only_this_machine`); otherwise it is refused."""
    if oauth_token is None or not oauth_token.token:
        raise PageError(
            "Sign in with Hugging Face first (the button at the top): the Space reads and writes the Hub "
            "as you, with no token of its own."
        )
    if oauth_token.token == GRADIO_MOCK_TOKEN:
        if not machine_login:
            raise PageError(MOCK_REFUSED)
        from huggingface_hub import get_token

        token = get_token()  # the account gradio's mocked login signed in as
        if not token:
            raise PageError(
                "Running outside a Space, the login button stands for this machine's Hugging Face login: "
                "run `hf auth login` or set HF_TOKEN, then restart the app."
            )
        return token
    return oauth_token.token


def parse_adapters(text: str) -> list[str]:
    """Adapter IDs from the text box: one per line (commas and spaces also separate); ``#`` starts a comment."""
    items = []
    for line in (text or "").splitlines():
        line = line.split("#", 1)[0]
        items += [p for p in re.split(r"[\s,]+", line) if p]
    return items


def _check_spec(spec: str, what: str, settings: Settings) -> str:
    if settings.allow_local_paths:
        return spec
    if spec.startswith(("/", ".", "~")) or "\\" in spec or Path(spec).expanduser().exists():
        raise PageError(
            f"{spec}: local folders cannot be used on the Space; give the {what} as a Hub ID "
            "(org/name or org/name@revision)"
        )
    return spec


def checked_inputs(adapters: str, base: str, settings: Settings) -> tuple[list[str], str]:
    ids = [_check_spec(a, "adapter", settings) for a in parse_adapters(adapters)]
    if not ids:
        raise PageError("no adapters given; name at least one LoRA adapter (org/name), or pick a preset")
    base = (base or "").strip()
    if not base:
        raise PageError("no base model given; name your base model in HF format (org/name)")
    return ids, _check_spec(base, "base model", settings)


def _last_name(spec: str) -> str:
    return spec.split("@", 1)[0].rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or "model"


def whoami(token: str, settings: Settings) -> str:
    """The signed-in user's name, asked of the Hub with their token."""
    from huggingface_hub import HfApi

    try:
        return HfApi(endpoint=settings.endpoint, token=token).whoami()["name"]
    except Exception as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise PageError(
            f"the Hub at {settings.hub_url} did not accept your sign-in ({status or type(exc).__name__}); "
            "sign out and in again"
        ) from None


def target_repo(target: str, adapters: Sequence[str], username: Callable[[], str]) -> str:
    """The repo to publish to: as typed (a bare name goes under the user's namespace), by default
    ``<user>/<last adapter's name>-merged``. ``username`` is asked only when needed."""
    target = (target or "").strip().strip("/")
    if not target:
        target = f"{_last_name(adapters[-1])}-merged"
    if "/" not in target:
        target = f"{username()}/{target}"
    if not _REPO_ID.match(target) or len(target.split("/", 1)[1]) > 96:
        raise PageError(
            f"{target}: not a valid repository name (namespace/name); use letters, digits, '-', '_' and "
            "'.', e.g. my-merged-model"
        )
    return target


# ---------------------------------------------------------------------------------------------------------------------
# Jobs: a private temporary folder each, always removed


@contextlib.contextmanager
def job_folder(settings: Settings) -> Iterator[Path]:
    settings.workdir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=JOB_PREFIX, dir=settings.workdir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def job(
    adapters: str, base: str, target: str, token: str, settings: Settings
) -> Iterator[tuple[list[str], str, str, Path]]:
    """What both buttons start from: the checked inputs, the target repo and a job folder, with hubmerge's errors
    shown as the page words them (:func:`shown_errors`). Yields ``(adapter ids, base, repo, folder)``."""
    ids, base = checked_inputs(adapters, base, settings)
    with shown_errors(token):
        repo = target_repo(target, ids, lambda: whoami(token, settings))
        with job_folder(settings) as folder:
            yield ids, base, repo, folder


def remove_stale_jobs(settings: Settings) -> None:
    """Jobs of a previous run of the app (killed mid-job) left their folders: remove them at start-up."""
    if settings.workdir.is_dir():
        for path in settings.workdir.glob(f"{JOB_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "<token>") if secret else text


def page_wording(message: str) -> str:
    """hubmerge's one-line message with its CLI advice turned into the page's controls."""
    for pattern, replacement in PAGE_WORDING:
        message = pattern.sub(replacement, message)
    return message


@contextlib.contextmanager
def shown_errors(token: str | None) -> Iterator[None]:
    """hubmerge's one-line messages go to the page in its own words; anything else is a bug: logged (token-free),
    and the page says so in one line. Either way the job's folder is gone and the page stays usable."""
    try:
        yield
    except PageError:
        raise
    except HubmergeError as exc:
        raise PageError(page_wording(_scrub(str(exc), token)), PAGE_HINTS.get(exc.remedy or "", DEFAULT_HINT)) from None
    except JobCancelled:
        raise PageError("the job was cancelled: its browser session ended") from None
    except Exception as exc:
        log.error("unexpected error:\n%s", _scrub(traceback.format_exc(), token))
        raise PageError(
            f"unexpected error ({type(exc).__name__}); nothing was published and the job's files were "
            "removed; please report it"
        ) from None


# ---------------------------------------------------------------------------------------------------------------------
# Progress: hubmerge's typed events, summed per stage, drawn as a panel

STAGE_LABELS = {"download": "Download", "verify": "Verify", "merge": "Merge", "upload": "Upload"}


@dataclass
class _Task:
    done: int = 0
    total: int | None = None
    finished: bool = False


@dataclass
class _Stage:
    tasks: dict[str, _Task] = field(default_factory=dict)
    started: float | None = None
    last: float | None = None  # time of the latest event
    current: str = ""  # the task that reported last and is not finished
    expected: int | None = None  # bytes the whole stage will move, when known before its tasks start

    @property
    def done(self) -> int:
        return sum(t.done for t in self.tasks.values())

    @property
    def total(self) -> int | None:
        """Bytes of the tasks begun so far (None while one of them has no size), or the expected bytes if more."""
        totals = [t.total for t in self.tasks.values() if t.total is not None]
        known = sum(totals) if self.tasks and len(totals) == len(self.tasks) else None
        return max(self.expected, known or 0) if self.expected is not None else known

    @property
    def finished(self) -> bool:
        """Every task that began has ended, and what was expected has all come."""
        tasks_done = bool(self.tasks) and all(t.finished for t in self.tasks.values())
        return tasks_done and (self.expected is None or self.done >= self.expected)


class JobProgress:
    """Receives a job's :class:`~hubmerge.progress.ProgressEvent` values (from any thread) and draws the progress
    panel: one row per stage with its files, bytes done of the total, rate and time left. The job stops at its next
    event once ``cancelled`` is set (the browser session ended)."""

    def __init__(
        self,
        title: str,
        cancelled: threading.Event | None = None,
        on_event: Callable[[ProgressEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.title = title
        self.cancelled = cancelled
        self.on_event = on_event
        self.clock = clock
        self.started = clock()
        self.ended: float | None = None
        self.stages: dict[str, _Stage] = {s: _Stage() for s in STAGES}
        self._lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise JobCancelled()
        now = self.clock()
        with self._lock:
            stage = self.stages.setdefault(event.stage, _Stage())
            task = stage.tasks.setdefault(event.name, _Task())
            task.done, task.total, task.finished = event.done, event.total, event.finished
            stage.started = now if stage.started is None else stage.started
            stage.last = now
            stage.current = "" if event.finished else event.name
        if self.on_event is not None:
            self.on_event(event)

    def expect(self, stage: str, nbytes: int) -> None:
        """Announce how many bytes ``stage`` will move in all, so its bar and time left cover the files to come."""
        with self._lock:
            self.stages[stage].expected = nbytes

    def finish(self) -> None:
        self.ended = self.clock()

    def state(self, name: str) -> str:
        """``waiting``, ``running`` or ``done``: a stage is done once its tasks (and the bytes it expected) finished
        and a later stage began, or the job ended."""
        stage = self.stages[name]
        if not stage.tasks:
            return "waiting"
        later = list(self.stages)[list(self.stages).index(name) + 1 :]
        if stage.finished and (self.ended is not None or any(self.stages[s].tasks for s in later)):
            return "done"
        return "running"

    def numbers(self, name: str) -> str:
        """'3.1 MB of 9.4 MB · 2 of 3 files · 1.2 MB/s · 0:05 left' (parts only where known)."""
        stage = self.stages[name]
        if not stage.tasks:
            return "waiting"
        with self._lock:
            done, total, files = stage.done, stage.total, len(stage.tasks)
            finished = sum(t.finished for t in stage.tasks.values())
            started, last = stage.started or 0.0, stage.last or 0.0
        end = last if self.state(name) == "done" else self.clock()
        rate = done / (end - started) if end - started > 0.05 else None
        parts = [f"{format_size(done)} of {format_size(total)}" if total is not None else format_size(done)]
        if name != "merge":  # the merge is one task (the output), the other stages one per file
            if finished < files:
                parts.append(f"{finished} of {_plural(files, 'file')}")
            else:
                parts.append(_plural(files, "file") + ("" if self.state(name) == "done" else " done"))
        if rate:
            parts.append(f"{format_size(rate)}/s")
        if self.state(name) == "done":
            parts.append(f"took {_clock(last - started)}")
        elif rate and total is not None and total > done:
            parts.append(f"about {_clock((total - done) / rate)} left")
        return " · ".join(parts)

    def html(self) -> str:
        elapsed = _clock((self.ended or self.clock()) - self.started)
        rows = []
        for name in self.stages:
            stage, state = self.stages[name], self.state(name)
            done, total = stage.done, stage.total
            share = 1.0 if state == "done" else (done / total if total else 0.0)
            current = html.escape(stage.current) if state == "running" else ""
            rows.append(
                f'<li class="hm-stage is-{state}" data-stage="{name}">'
                f'<div class="hm-stage-head"><span class="hm-stage-name">{STAGE_LABELS.get(name, name)}</span>'
                f'<span class="hm-stage-file">{current}</span></div>'
                f'<div class="hm-bar" role="progressbar" aria-valuemin="0" aria-valuemax="100" '
                f'aria-valuenow="{share * 100:.0f}"><div style="width:{share * 100:.1f}%"></div></div>'
                f'<div class="hm-stage-nums">{html.escape(self.numbers(name))}</div></li>'
            )
        return (
            f'<div class="hm-progress" role="status" aria-live="polite"><div class="hm-progress-title">'
            f"<b>{html.escape(self.title)}</b><span>{elapsed}</span></div>"
            f'<ol class="hm-stages">{"".join(rows)}</ol></div>'
        )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------------------------------
# The two actions, callable without the UI (tests, gradio_client)


@dataclass
class TargetStatus:
    """The publish target as the Check found it."""

    repo_id: str
    ok: bool  # Merge and push can publish there with the current settings
    message: str


@dataclass
class CheckResult:
    preview: Preview
    target: TargetStatus


def dry_run(
    ids: list[str],
    base: str,
    job: Path,
    dtype: str,
    repo: str,
    private: bool,
    overwrite: bool,
    token: str,
    settings: Settings,
) -> Preview:
    """hubmerge's dry run of this job (configs and tokenizers fetched into the job's folder, no weights), with the
    push target's state reported, not raised."""
    return plan_preview(
        ids,
        base,
        work_dir=job,
        dtype=dtype or None,
        token=token,
        cache_dir=job / "cache",
        endpoint=settings.endpoint,
        push_to=repo,
        overwrite=bool(overwrite),
        public=not private,
    )


def run_check(
    adapters: str,
    base: str,
    dtype: str,
    target: str,
    private: bool,
    overwrite: bool,
    token: str,
    settings: Settings,
) -> CheckResult:
    """The dry run (configs and tokenizers are fetched; no weights) and the publish target's state."""
    with job(adapters, base, target, token, settings) as (ids, base, repo, folder):
        preview = dry_run(ids, base, folder, dtype, repo, private, overwrite, token, settings)
    # hubmerge's push preflight (creates nothing, always made with push_to): what Merge and push would do, or why not
    push = preview.target
    assert push is not None
    return CheckResult(preview, TargetStatus(repo, push.can_write, page_wording(push.message)))


@dataclass
class Published:
    """What Merge and push made: the repo, its card, the files' SHA256, the command that makes the same files."""

    repo_id: str
    url: str
    private: bool
    files: dict[str, str]
    card: str
    command: str
    facts: list[str]


def run_merge(
    adapters: str,
    base: str,
    dtype: str,
    target: str,
    private: bool,
    overwrite: bool,
    token: str,
    settings: Settings,
    progress: JobProgress | None = None,
) -> Published:
    """Merge and push, streamed (download, merge and upload overlap). A job that fails or is cancelled before its
    commit leaves no repository behind (hubmerge deletes the one it created)."""
    from hubmerge.output.recipe import reproduce_command
    from hubmerge.plan import dtype_name

    with job(adapters, base, target, token, settings) as (ids, base, repo, folder):
        if progress is not None:  # the download's size, known before it starts, gives its bar a fixed end
            ahead = dry_run(ids, base, folder, dtype, repo, private, overwrite, token, settings)
            progress.expect("download", sum(row.download or 0 for row in ahead.inputs))
        result = hubmerge.merge(  # streamed: the job folder only ever holds the shards in flight
            ids,
            base,
            formats=["hf"],
            work_dir=folder,
            dtype=dtype or None,
            push_to=repo,
            public=not private,
            overwrite=bool(overwrite),
            token=token,
            cache_dir=folder / "cache",
            endpoint=settings.endpoint,
            progress=False,
            progress_callback=progress,
        )
    pushed, plan = result.push, result.plan
    assert pushed is not None  # merge() with push_to always publishes
    command = reproduce_command(pushed.recipe)
    changed = sum(t.changed for t in plan.tensors)
    facts = [
        f"{_plural(len(plan.adapters), 'adapter')} applied in order: {', '.join(a.label for a in plan.adapters)}",
        f"vocabulary: {plan.vocab_size} tokens; {changed} of {_plural(len(plan.tensors), 'tensor')} changed; "
        f"dtype {dtype_name(plan.dtype)}",
        f"{_plural(len(pushed.files), 'file')} and the model card published in {_clock(result.seconds)}",
    ]
    return Published(pushed.repo_id, pushed.url, pushed.private, pushed.files, pushed.card, command, facts)


@contextlib.contextmanager
def session_job(settings: Settings, request: gr.Request | None) -> Iterator[threading.Event]:
    """A job of the browser session behind ``request``: yields its cancel flag, which ``on_unload`` sets when that
    session ends (the tab closed) while the job runs."""
    session = getattr(request, "session_hash", None)
    cancelled = threading.Event()
    if session:
        settings.cancelled[session] = cancelled
    try:
        yield cancelled
    finally:
        if session and settings.cancelled.get(session) is cancelled:
            del settings.cancelled[session]


# ---------------------------------------------------------------------------------------------------------------------
# Rendering: plan, result, recent merges


def _cell(value: Any) -> str:
    return (
        "–" if value is None or value == "" else html.escape(f"{value:g}" if isinstance(value, float) else str(value))
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="hm-scroll"><table class="hm-table {cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def plan_html(check: CheckResult, hub_url: str) -> str:
    """The Check's answer: the inputs in the order they apply, the output, then the warnings and the target."""
    p = check.preview
    rows = []
    for i, row in enumerate(p.inputs):
        source = html.escape(row.source)
        commit = html.escape(row.commit or "")  # a value the Hub sent: shown as text only
        if commit:
            source = f'<a href="{html.escape(hub_url)}/{source}/tree/{commit}" target="_blank">{source}</a>'
        commit = f'<code title="{commit}">{commit[:12]}</code>' if commit else "local folder"
        download = (
            "local" if row.download is None else f"{format_size(row.download)} ({_plural(row.files or 0, 'file')})"
        )
        rows.append(
            [
                "base" if row.role == "base" else str(i),
                source,
                commit,
                _cell(row.r),
                _cell(row.alpha),
                _cell(row.scale),
                _cell(row.vocab),
                html.escape(download),
            ]
        )
    inputs = _table(["step", "source", "revision", "r", "alpha", "scale", "vocabulary", "download"], rows, "hm-inputs")
    disk = f"{format_size(p.disk)} ({format_size(p.free)} free)"
    output = _table(
        ["dtype", "vocabulary", "shards", "disk"],
        [[html.escape(p.dtype), str(p.vocab), str(p.shards), html.escape(disk)]],
        "hm-output",
    )
    warnings = [*p.warnings] + ([] if check.target.ok else [check.target.message])
    notes = "".join(f'<li class="hm-warning">{html.escape(w)}</li>' for w in warnings)
    if check.target.ok:
        notes += f'<li class="hm-ok">{html.escape(check.target.message)}</li>'
    return (
        '<div class="hm-plan"><h3>Plan</h3><p>Nothing but configs and tokenizers was downloaded; Merge and push '
        "runs this, in this order. Tensor shapes are checked after download, before anything is written.</p>"
        f"<h4>Inputs</h4>{inputs}<h4>Output</h4>{output}<ul class='hm-notes'>{notes}</ul></div>"
    )


def _card_body(card: str) -> str:
    """The model card without its YAML front matter, which the Hub shows as metadata rather than text."""
    if card.startswith("---\n"):
        end = card.find("\n---", 4)
        if end != -1:
            return card[end + 4 :].lstrip("\n")
    return card


def error_html(error: PageError) -> str:
    return (
        f'<div class="hm-error" role="alert"><b>Error</b><p>{html.escape(str(error))}</p>'
        f"<p class='hm-hint'>{html.escape(error.hint)}</p></div>"
    )


@dataclass
class RecentMerge:
    repo_id: str
    url: str
    date: str
    sources: list[str]
    private: bool


def recent_merges(user: str, token: str, settings: Settings) -> list[RecentMerge]:
    """The user's repositories whose card carries hubmerge's tag, newest first (asked of the Hub; nothing stored)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=settings.endpoint, token=token)
    found = []
    for info in api.list_models(
        author=user,
        filter="hubmerge",
        sort="lastModified",
        limit=RECENT_LIMIT,
        expand=["cardData", "createdAt", "lastModified", "private", "tags"],
    ):
        data = info.card_data.to_dict() if info.card_data else {}
        sources = data.get("base_model") or []
        when = info.last_modified or info.created_at
        found.append(
            RecentMerge(
                info.id,
                f"{settings.hub_url}/{info.id}",
                when.strftime("%Y-%m-%d %H:%M") if when else "",
                [sources] if isinstance(sources, str) else [str(s) for s in sources],
                bool(info.private),
            )
        )
    return found


def recent_html(user: str | None, merges: Sequence[RecentMerge] | None, problem: str | None = None) -> str:
    if user is None:
        return "<p>Sign in to see the models you merged here.</p>"
    if problem:
        return f'<p class="hm-warning">{html.escape(problem)}</p>'
    if not merges:
        return f"<p>No merged models under <code>{html.escape(user)}</code> yet (found by the <code>hubmerge</code> tag).</p>"
    rows = [
        [
            f'<a href="{html.escape(m.url)}" target="_blank">{html.escape(m.repo_id)}</a>',
            html.escape(m.date),
            "<br>".join(html.escape(s) for s in m.sources) or "–",
            "private" if m.private else "public",
        ]
        for m in merges
    ]
    return _table(["repository", "changed", "sources, in order", "visibility"], rows, "hm-recent")


# ---------------------------------------------------------------------------------------------------------------------
# The page

CSS = """
.hm-progress, .hm-error, .hm-plan { border-radius: 8px; padding: 12px 14px; }
.hm-idle { color: var(--body-text-color-subdued); font-size: 0.9em; padding: 2px 4px; }
.hm-progress { border: 1px solid var(--border-color-primary); background: var(--block-background-fill); }
.hm-progress-title { display: flex; justify-content: space-between; gap: 8px; margin-bottom: 6px; }
.hm-stages { list-style: none; margin: 0; padding: 0; display: grid; gap: 10px; }
.hm-stage-head { display: flex; justify-content: space-between; gap: 8px; flex-wrap: wrap; }
.hm-stage-name { font-weight: 600; }
.hm-stage-file { font-family: var(--font-mono); font-size: 0.9em; overflow-wrap: anywhere; }
.hm-stage.is-waiting { opacity: 0.55; }
.hm-bar { height: 8px; border-radius: 4px; background: var(--neutral-200); overflow: hidden; margin: 4px 0; }
.hm-bar > div { height: 100%; background: var(--color-accent); transition: width 0.3s; }
.hm-stage.is-done .hm-bar > div { background: var(--color-green-500, #22c55e); }
.hm-stage-nums { font-size: 0.9em; font-variant-numeric: tabular-nums; }
.hm-error { border: 2px solid #dc2626; background: #fef2f2; color: #7f1d1d; }
.hm-error p { margin: 4px 0 0; overflow-wrap: anywhere; }
.hm-warning { color: #92400e; background: #fffbeb; border-left: 4px solid #f59e0b; padding: 4px 8px; margin: 4px 0;
  list-style: none; }
.hm-ok { color: #14532d; background: #f0fdf4; border-left: 4px solid #22c55e; padding: 4px 8px; margin: 4px 0;
  list-style: none; }
.hm-notes { padding: 0; margin: 8px 0 0; }
.hm-scroll, #card table { display: block; overflow-x: auto; max-width: 100%; }
.hm-table, #card table { border-collapse: collapse; border: 0; }
.hm-table th, .hm-table td, #card th, #card td { white-space: nowrap; word-break: normal; overflow-wrap: normal;
  padding: 4px 10px; text-align: left; border: 0; border-bottom: 1px solid var(--border-color-primary); }
.hm-inputs td:nth-child(n+4):nth-child(-n+7) { text-align: right; }
#reproduce { max-width: 100%; }
@media (max-width: 480px) {
  .gradio-container { padding: 0 6px !important; }
  .hm-progress, .hm-error, .hm-plan { padding: 8px; }
}
"""


def create_app(settings: Settings | None = None) -> gr.Blocks:
    settings = settings or default_settings()
    remove_stale_jobs(settings)
    local = " or a local folder" if settings.allow_local_paths else ""
    no_login = local_login_problem(settings)

    with gr.Blocks(title="hubmerge: merge LoRA adapters into your base model") as demo:
        gr.Markdown(
            "# hubmerge\nMerge LoRA adapters from the Hugging Face Hub into your own base model (LLaMA, Mistral, "
            "Qwen2, Gemma), checked "
            "before a byte is written, streamed tensor by tensor, and published to a **private** repository "
            "of yours with a model card that pins every source and lists every file's SHA256."
        )
        if no_login is None:
            with gr.Row():
                gr.LoginButton()
            account = gr.Markdown(SIGNED_OUT, elem_id="account")
        else:
            account = gr.Markdown(NO_LOCAL_LOGIN.format(reason=no_login, hub=settings.hub_url), elem_id="account")
        with gr.Row():
            with gr.Column(scale=3, min_width=300):
                preset = gr.Dropdown(
                    choices=["(none)", *PRESETS],
                    value="(none)",
                    label="Preset",
                    info="Chinese-LLaMA/Alpaca: fills the adapters in the order the recipe applies "
                    "them (Plus and Pro: LLaMA-Plus first); the -2 presets go on a Llama-2 base",
                )
                adapters = gr.Textbox(
                    label="LoRA adapters, in the order they apply",
                    lines=3,
                    max_lines=8,
                    placeholder="org/adapter-name  (one per line; org/name@revision pins one)",
                    elem_id="adapters",
                )
                base = gr.Textbox(
                    label="Base model (yours, HF format: LLaMA, Mistral, Qwen2 or Gemma)",
                    elem_id="base",
                    placeholder=f"org/base-model or org/base-model@revision{local}",
                )
            with gr.Column(scale=2, min_width=300):
                dtype = gr.Dropdown(choices=DTYPES, value="", label="Output dtype")
                target = gr.Textbox(
                    label="Publish to", elem_id="target", placeholder="<you>/<last adapter's name>-merged"
                )
                private = gr.Checkbox(value=True, label="Private repository")
                overwrite = gr.Checkbox(value=False, label=OVERWRITE_LABEL)
        with gr.Row():
            check_btn = gr.Button("Check", interactive=False, min_width=120)
            merge_btn = gr.Button("Merge and push", variant="primary", interactive=False, min_width=120)
        # always on the page: where a queued job shows its place in the queue, and a running one its stages
        progress_box = gr.HTML(IDLE, elem_id="progress")
        error_box = gr.HTML(visible=False, elem_id="error")
        plan = gr.HTML(visible=False, elem_id="plan")
        with gr.Column(visible=False, elem_id="result") as result:
            link = gr.Markdown(elem_id="result-link")
            summary = gr.Markdown(elem_id="summary")
            reproduce = gr.Code(
                language="shell",
                label="Reproduce locally: the same files from the same pinned sources",
                interactive=False,
                wrap_lines=True,
                lines=1,
                max_lines=8,
                show_line_numbers=False,
                elem_id="reproduce",
            )
            with gr.Accordion("Model card (README.md of the new repository)", open=True):
                card = gr.Markdown(elem_id="card")
            sha = gr.Dataframe(
                headers=["file", "sha256"],
                label="SHA256 of the published files",
                interactive=False,
                elem_id="sha256",
                wrap=False,
            )
        with gr.Accordion("Recent merges", open=False, elem_id="recent-panel"):
            recent_refresh = gr.Button("Refresh", size="sm", min_width=80)
            recent = gr.HTML(recent_html(None, None), elem_id="recent")

        results = [progress_box, error_box, plan, result]  # what a new step replaces

        def cleared() -> dict:
            """Every step starts from a clean page: no progress, error, plan or result of an earlier one."""
            return {c: gr.update(visible=False) for c in results} | {progress_box: IDLE}

        def signed_in_name(profile: gr.OAuthProfile | None) -> str | None:
            return profile.username if profile is not None else None

        def load_recent(profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None) -> str:
            user = signed_in_name(profile)
            if user is None:
                return recent_html(None, None)
            try:
                return recent_html(
                    user, recent_merges(user, user_token(oauth_token, only_this_machine(demo)), settings)
                )
            except PageError as exc:
                return recent_html(user, None, str(exc))
            except Exception as exc:  # the list is a convenience: say it is missing, never break the page
                return recent_html(user, None, f"the Hub did not list your models ({type(exc).__name__}); refresh")

        def on_load(profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None):
            signed_in = profile is not None
            if no_login is not None:
                text = NO_LOCAL_LOGIN.format(reason=no_login, hub=settings.hub_url)
            elif signed_in:
                text = (
                    f"Signed in as **{profile.username}**: the page reads and writes the Hub as you. New repositories "
                    f"go to `{profile.username}/...` unless you name another namespace you can write to."
                )
            else:
                text = SIGNED_OUT
            if signed_in and oauth_token is not None and oauth_token.token == GRADIO_MOCK_TOKEN:
                signed_in = only_this_machine(demo)
                text = f"{text}\n\n{MACHINE_LOGIN}" if signed_in else f"**Not signed in.** {MOCK_REFUSED}."
            target_hint = f"{profile.username}/<last adapter's name>-merged" if signed_in else "<you>/..."
            return (
                text,
                gr.Button(interactive=signed_in),
                gr.Button(interactive=signed_in),
                gr.Textbox(placeholder=target_hint),
            )

        demo.load(on_load, None, [account, check_btn, merge_btn, target], api_visibility="private")
        demo.load(load_recent, None, recent, api_visibility="private")
        recent_refresh.click(load_recent, None, recent, api_visibility="private")

        def fill_preset(name: str):
            return "\n".join(PRESETS[name]) if name in PRESETS else gr.skip()

        preset.change(fill_preset, preset, adapters, api_visibility="private")
        # typed by hand: no longer the preset (in the browser: no server round trip per keystroke)
        adapters.input(None, None, preset, js="() => '(none)'", api_visibility="private")

        def show_check(
            adapters: str,
            base: str,
            dtype: str,
            target: str,
            private: bool,
            overwrite: bool,
            oauth_token: gr.OAuthToken | None,
        ):
            busy = _busy("Checking: resolving the inputs and reading their configs (no weights)...")
            yield cleared() | {progress_box: busy}
            try:
                token = user_token(oauth_token, only_this_machine(demo))
                checked = run_check(adapters, base, dtype, target, private, overwrite, token, settings)
            except PageError as exc:
                yield cleared() | {error_box: gr.update(visible=True, value=error_html(exc))}
                return
            yield cleared() | {plan: gr.update(visible=True, value=plan_html(checked, settings.hub_url))}

        check_btn.click(
            show_check,
            [adapters, base, dtype, target, private, overwrite],
            results,
            api_visibility="private",
            concurrency_limit=4,
            concurrency_id="check",
            show_progress="hidden",
        )

        def show_merge(
            adapters: str,
            base: str,
            dtype: str,
            target: str,
            private: bool,
            overwrite: bool,
            oauth_token: gr.OAuthToken | None,
            profile: gr.OAuthProfile | None,
            request: gr.Request,
        ):
            outcome: dict[str, Any] = {}
            with session_job(settings, request) as cancelled:
                progress = JobProgress("Merge and push", cancelled, settings.on_event)

                def work() -> None:
                    try:
                        token = user_token(oauth_token, only_this_machine(demo))
                        outcome["done"] = run_merge(
                            adapters, base, dtype, target, private, overwrite, token, settings, progress
                        )
                    except PageError as exc:
                        outcome["error"] = exc
                    finally:
                        progress.finish()

                # the job runs beside this generator, which redraws the panel until it ends
                worker = threading.Thread(target=work, name="hubmerge-job", daemon=True)
                try:
                    worker.start()
                    while worker.is_alive():
                        yield cleared() | {progress_box: progress.html()}
                        worker.join(settings.refresh_seconds)
                finally:  # the page went away (generator closed) or the job ended: either way stop it first
                    cancelled.set()
                    worker.join()
            panel = progress.html()
            if "error" in outcome:
                error = gr.update(visible=True, value=error_html(outcome["error"]))
                yield cleared() | {progress_box: panel, error_box: error}
                return
            done: Published = outcome["done"]
            yield cleared() | {
                progress_box: panel,
                result: gr.update(visible=True),
                link: f"### Published: [{done.repo_id}]({done.url}) ({'private' if done.private else 'public'})",
                summary: "\n".join(f"- {_md_escape(f)}" for f in done.facts),
                reproduce: done.command,
                card: _card_body(done.card),
                sha: [[name, digest] for name, digest in sorted(done.files.items())],
                recent: load_recent(profile, oauth_token),
            }

        merge_btn.click(
            show_merge,
            [adapters, base, dtype, target, private, overwrite],
            [*results, link, summary, reproduce, card, sha, recent],
            api_visibility="private",
            concurrency_limit=1,
            concurrency_id="merge",
            show_progress_on=[progress_box],
            show_progress="minimal",
        )

        # The API (gradio_client): the same two steps, answering data and raising errors instead of drawing panels.
        def check(
            adapters: str,
            base: str,
            dtype: str,
            target: str,
            private: bool,
            overwrite: bool,
            oauth_token: gr.OAuthToken | None,
        ) -> dict:
            """Check a merge: the plan as data, and whether the target repository can take the result."""
            try:
                token = user_token(oauth_token, only_this_machine(demo))
                checked = run_check(adapters, base, dtype, target, private, overwrite, token, settings)
            except PageError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            p = checked.preview
            return {
                "inputs": [vars(row) for row in p.inputs],
                "output": {"dtype": p.dtype, "vocab": p.vocab, "shards": p.shards, "disk": p.disk, "free": p.free},
                "warnings": p.warnings,
                "target": vars(checked.target),
            }

        def merge(
            adapters: str,
            base: str,
            dtype: str,
            target: str,
            private: bool,
            overwrite: bool,
            oauth_token: gr.OAuthToken | None,
            request: gr.Request,
        ) -> dict:
            """Merge and push; the published repository, its files' SHA256, card and reproduce command."""
            try:
                with session_job(settings, request) as cancelled:
                    token = user_token(oauth_token, only_this_machine(demo))
                    progress = JobProgress("Merge and push", cancelled, settings.on_event)
                    return vars(run_merge(adapters, base, dtype, target, private, overwrite, token, settings, progress))
            except PageError as exc:
                raise gr.Error(str(exc), print_exception=False) from None

        gr.api(check, api_name="check", concurrency_limit=4, concurrency_id="check")
        gr.api(merge, api_name="merge", concurrency_limit=1, concurrency_id="merge")

        def on_unload(request: gr.Request):
            event = settings.cancelled.pop(getattr(request, "session_hash", None), None)
            if event is not None:
                event.set()

        demo.unload(on_unload)
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo


IDLE = (
    '<div class="hm-idle">No job running. <b>Check</b> reads only configs and tokenizers; <b>Merge and push</b> '
    "downloads, verifies, merges and uploads, each stage shown here as it runs.</div>"
)


def _busy(text: str) -> str:
    return f'<div class="hm-progress" role="status" aria-live="polite"><b>{html.escape(text)}</b></div>'


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>#|])", r"\\\1", text)


# Run history (gradio 6) would keep each run's inputs and outputs and offer to sync them to a Hub bucket: not here.
LAUNCH = {"show_error": True, "run_history": False, "css": CSS}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)  # not INFO: HTTP client logs carry request URLs
    create_app().launch(**LAUNCH)


if __name__ == "__main__":
    main()
