"""The hubmerge Space: merge LoRA adapters from the Hub into the user's own LLaMA base and publish the result to a
private repo of theirs, signed in with Hugging Face.

This file is UI only. The work is done by hubmerge's public API: :func:`hubmerge.preview` (the Check step, the same
plan the CLI's ``--dry-run`` prints) and :func:`hubmerge.merge` with ``push_to`` (download, verify, merge, upload).
Errors are :class:`hubmerge.HubmergeError` with the CLI's one-line messages; they are shown as they are.

Rules the page keeps:

- Every Hub call carries the signed-in user's OAuth token (``gr.OAuthToken``), passed explicitly: never a token of
  the Space's own (an ``HF_TOKEN`` secret of the Space is never used). Tokens are never logged, printed or written.
  Off Spaces, gradio's mocked login hands out a fixed placeholder token and signs in as this machine's own Hugging Face
  login. Anyone who can reach the app can send that placeholder, so the app lends this machine's login (``HF_TOKEN``
  or ``hf auth login``) for it only while nobody else can reach the app: listening on a loopback address alone, with
  no share link (:func:`only_this_machine`); the page says so. Otherwise the placeholder is refused and a real token
  is needed (Spaces' OAuth, or gradio_client's ``oauth_token``).
- One merge at a time (queue with a visible position); each job works in its own temporary folder (download cache
  and output), removed when the job ends, failed or not. When the user closes the tab, gradio runs the ``unload``
  event: a merge of that session still running stops at its next progress update and cleans up.
- Local folders as inputs are allowed only off Spaces (``HUBMERGE_SPACE_LOCAL_PATHS=1``/``0`` overrides): on a shared
  server a path could name another job's files.

Run locally: ``python space/app.py`` (see the README's "Gradio Space" section); ``HF_ENDPOINT`` picks the Hub.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

import hubmerge
from hubmerge import HubmergeError

log = logging.getLogger("hubmerge.space")

# Gradio's mocked OAuth (outside Spaces) gives every session this fixed token; see gradio.oauth._get_mocked_oauth_info.
GRADIO_MOCK_TOKEN = "mock-oauth-token-for-local-dev"
JOB_PREFIX = "hubmerge-job-"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


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

DTYPES = [("the base's dtype", ""), ("float16", "float16"), ("bfloat16", "bfloat16"), ("float32", "float32")]

SIGNED_OUT = """\
**Sign in with Hugging Face to merge.** Signing in lets this page act as you, and only as you, on the Hub:
read the adapters and *your own* base model (also private ones: `read-repos`), create a repository in your
namespace (`manage-repos`) and push the merged model to it (`write-repos`). The new repository is private unless you
untick *Private*. The Space has no token of its own; signing out (or closing the tab) ends its access."""


MACHINE_LOGIN = (
    "The app listens on this machine only, so the sign-in button stands for this machine's own Hugging Face login "
    "(`HF_TOKEN` or `hf auth login`)."
)
MOCK_REFUSED = (
    "gradio's local sign-in stands for this machine's own Hugging Face login, which the app lends only while it "
    "listens on 127.0.0.1 alone (no share link); it is reachable from elsewhere now: run it on 127.0.0.1, or sign "
    "in with a real token (gradio_client's oauth_token)"
)


@dataclass
class Settings:
    """Where the app's Hub calls go and where jobs put their files."""

    endpoint: str | None = None  # None: the client's default (HF_ENDPOINT, else huggingface.co)
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "hubmerge-space")
    allow_local_paths: bool = False
    # session hash -> set when that browser session ends (tab closed): its running job stops
    cancelled: dict[str, threading.Event] = field(default_factory=dict)
    on_stage: Callable[[str], None] | None = None  # called with each stage name as the page shows it (tests)

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


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


class JobCancelled(Exception):
    """The browser session that started the job has ended."""


def user_token(oauth_token: gr.OAuthToken | None, machine_login: bool = False) -> str:
    """The signed-in user's token; a one-line error when nobody is signed in. gradio's mock token stands for this
    machine's own login only when ``machine_login`` (the app is reachable from this machine only, see
    :func:`only_this_machine`); otherwise it is refused."""
    if oauth_token is None or not oauth_token.token:
        raise gr.Error(
            "Sign in with Hugging Face first (the button at the top): the Space reads and writes the Hub "
            "as you, with no token of its own.",
            print_exception=False,
        )
    if oauth_token.token == GRADIO_MOCK_TOKEN:
        if not machine_login:
            raise gr.Error(MOCK_REFUSED, print_exception=False)
        from huggingface_hub import get_token

        token = get_token()  # the account gradio's mocked login signed in as
        if not token:
            raise gr.Error(
                "Running outside a Space, the login button stands for this machine's Hugging Face login: "
                "run `hf auth login` or set HF_TOKEN, then restart the app.",
                print_exception=False,
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
        raise gr.Error(
            f"{spec}: local folders cannot be used on the Space; give the {what} as a Hub ID "
            "(org/name or org/name@revision)",
            print_exception=False,
        )
    return spec


def checked_inputs(adapters: str, base: str, settings: Settings) -> tuple[list[str], str]:
    ids = [_check_spec(a, "adapter", settings) for a in parse_adapters(adapters)]
    if not ids:
        raise gr.Error(
            "no adapters given; name at least one LoRA adapter (org/name), or pick a preset", print_exception=False
        )
    base = (base or "").strip()
    if not base:
        raise gr.Error("no base model given; name your LLaMA base in HF format (org/name)", print_exception=False)
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
        raise gr.Error(
            f"the Hub at {settings.hub_url} did not accept your sign-in ({status or type(exc).__name__}); "
            "sign out and in again",
            print_exception=False,
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
        raise gr.Error(
            f"{target}: not a valid repository name (namespace/name); use letters, digits, '-', '_' and "
            "'.', e.g. my-merged-model",
            print_exception=False,
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


def remove_stale_jobs(settings: Settings) -> None:
    """Jobs of a previous run of the app (killed mid-job) left their folders: remove them at start-up."""
    if settings.workdir.is_dir():
        for path in settings.workdir.glob(f"{JOB_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "<token>") if secret else text


@contextlib.contextmanager
def shown_errors(token: str | None) -> Iterator[None]:
    """hubmerge's one-line messages go to the page as they are; anything else is a bug: logged (token-free), and the
    page says so in one line. Either way the job's folder is gone and the page stays usable."""
    try:
        yield
    except gr.Error:
        raise
    except HubmergeError as exc:
        raise gr.Error(_scrub(str(exc), token), print_exception=False) from None
    except JobCancelled:
        raise gr.Error("the job was cancelled: its browser session ended", print_exception=False) from None
    except Exception as exc:
        log.error("unexpected error:\n%s", _scrub(traceback.format_exc(), token))
        raise gr.Error(
            f"unexpected error ({type(exc).__name__}); nothing was published and the job's files were "
            "removed; please report it",
            print_exception=False,
        ) from None


# ---------------------------------------------------------------------------------------------------------------------
# Progress: hubmerge and the Hub client report through tqdm bars; name each after the stage it belongs to.


class StageProgress:
    """Wraps the job's ``gr.Progress(track_tqdm=True)`` so the page shows which stage a bar belongs to.

    hubmerge's merge opens one tqdm bar named ``merge`` (bytes of tensors written); before it, the Hub client opens
    one bar per downloaded file (named after the file), and after it, the upload bars (``Upload N LFS files``, or one
    per file). After each download hubmerge checks the file against the Hub's SHA256: big files get a bar of their
    own (``verify <file>``), small ones none, and the page says "verify <file>" until the next bar. The outer level
    reads ``stage k/4: <stage>`` with the share of stages done; the inner level is the current bar. Any hook also
    stops the job once its session has ended.
    """

    STAGES = ("download", "verify", "merge", "upload")

    def __init__(
        self,
        progress: gr.Progress,
        cancelled: threading.Event | None = None,
        on_stage: Callable[[str], None] | None = None,
    ):
        from gradio.helpers import TrackedIterable

        self.progress = progress
        self.cancelled = cancelled
        self.on_stage = on_stage
        self.seen: list[str] = []  # stage names in the order they were shown
        self._bars: dict[int, str] = {}  # id(tqdm) -> the file it downloads (download bars only)
        self._merged = False
        self._merge_bar: int | None = None
        self._stage = TrackedIterable(None, 0, len(self.STAGES), None, "stages")
        self._orig = progress.tqdm, progress.update, progress.close
        progress.tqdm, progress.update, progress.close = self._tqdm, self._update, self._close
        progress.iterables.insert(0, self._stage)
        self.set_stage("download", "looking up the inputs")

    def set_stage(self, stage: str, detail: str = "") -> None:
        k = self.STAGES.index(stage)
        self._stage.index = k
        self._stage.desc = f"stage {k + 1}/{len(self.STAGES)}: {stage}" + (f" {detail}" if detail else "")
        self._orig[1](0)  # send the levels as they are now
        if not self.seen or self.seen[-1] != stage:
            self.seen.append(stage)
            if self.on_stage is not None:
                self.on_stage(stage)

    def _check(self) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise JobCancelled()

    def _tqdm(self, iterable, desc=None, total=None, unit="steps", _tqdm=None):
        self._check()
        name = str(desc or "").rsplit("/", 1)[-1]
        if desc == "merge":  # hubmerge.pipeline's bar: tensors merged and written, in bytes
            self._merged = True
            self._merge_bar = id(_tqdm)
            self.set_stage("merge")
            name = "tensors written"
        elif self._merged:
            self.set_stage("upload")
        elif str(desc).startswith("verify "):  # hubmerge.inputs.sources' bar for the SHA256 of a big download, in bytes
            self.set_stage("verify", f"{name.removeprefix('verify ')} (SHA256)")
            name = "bytes hashed"
        else:
            self._bars[id(_tqdm)] = name
            self.set_stage("download")
        return self._orig[0](iterable, name, total, unit, _tqdm=_tqdm)

    def _update(self, n=1):
        self._check()
        return self._orig[1](n)

    def _close(self, _tqdm):
        file = self._bars.pop(id(_tqdm), None)
        if file is not None:  # a download finished: hubmerge now checks its SHA256 against the Hub's record
            self.set_stage("verify", f"{file} (SHA256)")
        elif id(_tqdm) == self._merge_bar:  # merged: hubmerge hashes the output, then the upload begins
            self._merge_bar = None
            self.set_stage("upload", "(hashing the output first)")
        return self._orig[2](_tqdm)

    def done(self) -> None:
        if self._stage in self.progress.iterables:
            self.progress.iterables.remove(self._stage)


# ---------------------------------------------------------------------------------------------------------------------
# The two actions, callable without the UI (tests, gradio_client)


def run_check(adapters: str, base: str, dtype: str, token: str, settings: Settings) -> str:
    """The dry-run plan as Markdown (configs and tokenizers are fetched; no weights)."""
    ids, base = checked_inputs(adapters, base, settings)
    with shown_errors(token), job_folder(settings) as job:
        lines = hubmerge.preview(
            ids,
            base,
            out=job / "out",
            dtype=dtype or None,
            token=token,
            cache_dir=job / "cache",
            endpoint=settings.endpoint,
        )
        lines = [line.replace(str((job / "out").resolve()), "a temporary folder") for line in lines]
    plan = "\n".join(f"- {_md_escape(line)}" for line in lines)
    return f"### Plan\n\nNothing but configs and tokenizers was downloaded; Merge and push runs this.\n\n{plan}"


def run_merge(
    adapters: str,
    base: str,
    dtype: str,
    target: str,
    private: bool,
    overwrite: bool,
    token: str,
    settings: Settings,
    stages: StageProgress | None = None,
):
    """Merge and push; returns the result's (link Markdown, summary Markdown, model card Markdown, SHA256 rows)."""
    ids, base = checked_inputs(adapters, base, settings)
    repo = target_repo(target, ids, lambda: whoami(token, settings))
    with shown_errors(token), job_folder(settings) as job:
        result = hubmerge.merge(
            ids,
            base,
            job / "out",
            formats=["hf"],
            dtype=dtype or None,
            push_to=repo,
            public=not private,
            overwrite=bool(overwrite),
            token=token,
            cache_dir=job / "cache",
            endpoint=settings.endpoint,
            progress=stages is not None,
        )
    pushed = result.push
    visibility = "private" if pushed.private else "public"
    link = f"### Published: [{pushed.repo_id}]({pushed.url}) ({visibility})"
    summary = "\n".join(f"- {_md_escape(line)}" for line in result.summary() if not line.startswith("hf: "))
    rows = [[name, digest] for name, digest in sorted(pushed.files.items())]
    return link, summary, _card_body(pushed.card), rows


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>#|])", r"\\\1", text)


def _card_body(card: str) -> str:
    """The model card without its YAML front matter, which the Hub shows as metadata rather than text."""
    if card.startswith("---\n"):
        end = card.find("\n---", 4)
        if end != -1:
            return card[end + 4 :].lstrip("\n")
    return card


# ---------------------------------------------------------------------------------------------------------------------
# The page


def create_app(settings: Settings | None = None) -> gr.Blocks:
    settings = settings or default_settings()
    remove_stale_jobs(settings)
    local = " or a local folder" if settings.allow_local_paths else ""

    with gr.Blocks(title="hubmerge: merge LoRA adapters into LLaMA") as demo:
        gr.Markdown(
            "# hubmerge\nMerge LoRA adapters from the Hugging Face Hub into your own LLaMA base, checked "
            "before a byte is written, streamed tensor by tensor, and published to a **private** repository "
            "of yours with a model card that pins every source and lists every file's SHA256."
        )
        with gr.Row():
            gr.LoginButton()
        account = gr.Markdown(SIGNED_OUT, elem_id="account")
        with gr.Row():
            with gr.Column(scale=3):
                preset = gr.Dropdown(
                    choices=["(none)", *PRESETS],
                    value="(none)",
                    label="Preset",
                    info="Chinese-LLaMA/Alpaca: fills the adapters in the order the recipe applies "
                    "them (Plus and Pro: LLaMA-Plus first)",
                )
                adapters = gr.Textbox(
                    label="LoRA adapters, in the order they apply",
                    lines=3,
                    max_lines=8,
                    placeholder="org/adapter-name  (one per line; org/name@revision pins one)",
                    elem_id="adapters",
                )
                base = gr.Textbox(
                    label="Base model (your LLaMA, HF format)",
                    elem_id="base",
                    placeholder=f"org/llama-7b-hf or org/llama-7b-hf@revision{local}",
                )
            with gr.Column(scale=2):
                dtype = gr.Dropdown(choices=DTYPES, value="", label="Output dtype")
                target = gr.Textbox(
                    label="Publish to", elem_id="target", placeholder="<you>/<last adapter's name>-merged"
                )
                private = gr.Checkbox(value=True, label="Private repository")
                overwrite = gr.Checkbox(value=False, label="Replace the files if the repository already has some")
        with gr.Row():
            check_btn = gr.Button("Check", interactive=False)
            merge_btn = gr.Button("Merge and push", variant="primary", interactive=False)
        plan = gr.Markdown(elem_id="plan")
        link = gr.Markdown(elem_id="result-link")
        summary = gr.Markdown(elem_id="summary")
        with gr.Accordion("Model card (README.md of the new repository)", open=True):
            card = gr.Markdown(elem_id="card")
        sha = gr.Dataframe(
            headers=["file", "sha256"], label="SHA256 of the published files", interactive=False, elem_id="sha256"
        )

        def on_load(profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None):
            signed_in = profile is not None
            text = (
                f"Signed in as **{profile.username}**: the page reads and writes the Hub as you. New repositories "
                f"go to `{profile.username}/...` unless you name another namespace you can write to."
                if signed_in
                else SIGNED_OUT
            )
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

        def fill_preset(name: str):
            return "\n".join(PRESETS[name]) if name in PRESETS else gr.skip()

        preset.change(fill_preset, preset, adapters, api_visibility="private")
        # typed by hand: no longer the preset (in the browser: no server round trip per keystroke)
        adapters.input(None, None, preset, js="() => '(none)'", api_visibility="private")

        def check(adapters: str, base: str, dtype: str, oauth_token: gr.OAuthToken | None) -> str:
            return run_check(adapters, base, dtype, user_token(oauth_token, only_this_machine(demo)), settings)

        check_btn.click(
            check, [adapters, base, dtype], plan, api_name="check", concurrency_limit=4, concurrency_id="check"
        )

        def merge(
            adapters: str,
            base: str,
            dtype: str,
            target: str,
            private: bool,
            overwrite: bool,
            oauth_token: gr.OAuthToken | None,
            request: gr.Request,
            progress=gr.Progress(track_tqdm=True),
        ):
            token = user_token(oauth_token, only_this_machine(demo))
            session = getattr(request, "session_hash", None)
            cancelled = threading.Event()
            if session:
                settings.cancelled[session] = cancelled  # set by on_unload while this job runs
            stages = StageProgress(progress, cancelled, settings.on_stage)
            try:
                return run_merge(adapters, base, dtype, target, private, overwrite, token, settings, stages)
            finally:
                stages.done()
                if session and settings.cancelled.get(session) is cancelled:
                    del settings.cancelled[session]

        merge_btn.click(
            merge,
            [adapters, base, dtype, target, private, overwrite],
            [link, summary, card, sha],
            api_name="merge",
            concurrency_limit=1,
            concurrency_id="merge",
            show_progress_on=[link],
        )

        def on_unload(request: gr.Request):
            event = settings.cancelled.pop(getattr(request, "session_hash", None), None)
            if event is not None:
                event.set()

        demo.unload(on_unload)
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo


# Run history (gradio 6) would keep each run's inputs and outputs and offer to sync them to a Hub bucket: not here.
LAUNCH = {"show_error": True, "run_history": False}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)  # not INFO: HTTP client logs carry request URLs
    create_app().launch(**LAUNCH)


if __name__ == "__main__":
    main()
