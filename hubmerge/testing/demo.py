"""``hubmerge demo``: the whole product, offline, in a temporary folder.

Builds a tiny LLaMA base and two real-format adapters that extend the vocabulary (a Chinese-LLaMA-Plus-like one in
the 2023 layout, then an Alpaca-Plus-like one in the current layout), starts the project's local Hub server,
publishes the adapters as public repos and the base as a private one, then runs the real flow with Hub IDs:
resolve, download, verify, merge (Plus recipe), push to a private repo. It shows that an anonymous client cannot
read the result and that the merged model's logits match PEFT's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..pipeline import merge
from . import tinymodels as tm
from .localhub import LocalHub

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["HF_HUB_DISABLE_XET"] = "1"  # the local server speaks plain HTTP + LFS, as older Hub deployments do


PUBLISHER, USER = "hfl", "you"
LLAMA_PLUS, ALPACA_PLUS = f"{PUBLISHER}/chinese-llama-plus-lora-tiny", f"{PUBLISHER}/chinese-alpaca-plus-lora-tiny"
BASE, RESULT = f"{USER}/llama-tiny-hf", f"{USER}/chinese-alpaca-plus-tiny"


def run(*, keep: bool = False, workdir: str | Path | None = None, say: Callable[[str], None] = print) -> int:
    """Run the demo; returns 0 when every step succeeded, 1 otherwise (the failing step says why)."""
    import warnings

    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    constants.HF_HUB_DISABLE_XET = True  # in case the client was imported before this module
    disable_progress_bars()  # the demo prints one line per step; library progress bars would bury them
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="hubmerge-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    state: dict = {}
    steps = [
        ("build a tiny base and two vocabulary-extending adapters", _build),
        ("start the local Hub and publish: adapters public, base private", _publish),
        ("merge from Hub IDs (resolve, download, verify, merge, push privately)", _merge),
        ("the result is private: anonymous access refused, owner allowed", _privacy),
        ("the merged model's logits match PEFT's merge_and_unload()", _oracle),
    ]
    started = time.monotonic()
    failed = None
    try:
        for n, (title, step) in enumerate(steps, 1):
            t0 = time.monotonic()
            say(f"[{n}/{len(steps)}] {title}")
            try:
                for line in step(root, state):
                    say(f"      {line}")
            except Exception as exc:  # the demo reports any failure as a failed step
                failed = f"step {n} failed: {type(exc).__name__}: {exc}"
                say(f"      FAILED: {exc}")
                break
            say(f"      done in {time.monotonic() - t0:.1f} s")
    finally:
        if "hub" in state:
            state["hub"].stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    say(
        f"summary: {failed or 'all steps passed'} in {time.monotonic() - started:.1f} s"
        + (f"; files kept in {root}" if keep else "")
    )
    return 1 if failed else 0


def _build(root: Path, state: dict):
    base = tm.make_base(root / "models" / "llama-tiny-hf", heads=4, kv_heads=2)
    state["base"] = base
    state["adapters"] = [
        tm.make_adapter(root / "models" / name, base, **recipe, seed=seed)
        for name, recipe, seed in zip(("llama-plus", "alpaca-plus"), tm.PLUS_RECIPE, (1, 2))
    ]
    yield f"base: {tm.sp_size(base / 'tokenizer.model')} tokens, GQA (4 heads, 2 kv heads), float16"
    for a in state["adapters"]:
        yield f"{a.name}: vocab {tm.sp_size(a / 'tokenizer.model')}"


def _publish(root: Path, state: dict):
    from huggingface_hub import HfApi

    hub = state["hub"] = LocalHub(root / "hub").start()
    publisher = hub.add_user(PUBLISHER)
    state["token"] = hub.add_user(USER)
    yield f"local Hub at {hub.url}"
    for repo, folder, private, token in (
        (LLAMA_PLUS, state["adapters"][0], False, publisher),
        (ALPACA_PLUS, state["adapters"][1], False, publisher),
        (BASE, state["base"], True, state["token"]),
    ):
        api = HfApi(endpoint=hub.url, token=token)
        api.create_repo(repo, private=private)
        api.upload_folder(repo_id=repo, folder_path=folder)
        yield f"{repo} ({'private' if private else 'public'})"


def _merge(root: Path, state: dict):
    result = merge(
        [LLAMA_PLUS, ALPACA_PLUS],
        BASE,
        root / "merged",
        formats=["hf", "pth"],
        push_to=RESULT,
        token=state["token"],
        endpoint=state["hub"].url,
        cache_dir=root / "cache",
        progress=False,
    )
    state["result"] = result
    yield from result.summary()


def _privacy(root: Path, state: dict):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    url = state["hub"].url
    try:
        hf_hub_download(RESULT, "config.json", endpoint=url, token=False, cache_dir=root / "anonymous-cache")
    except RepositoryNotFoundError as exc:
        if isinstance(exc, GatedRepoError):
            raise
        yield "anonymous download: refused (repository not found)"
    else:
        raise RuntimeError(f"an anonymous client could read {RESULT}")
    info = HfApi(endpoint=url, token=state["token"]).model_info(RESULT)
    if not info.private:
        raise RuntimeError(f"{RESULT} is public")
    yield f"owner: sees {len(info.siblings or [])} files, private={info.private}"


def _oracle(root: Path, state: dict):
    import torch
    from huggingface_hub import snapshot_download

    from .tinymodels import check_against_peft

    pulled = snapshot_download(RESULT, endpoint=state["hub"].url, token=state["token"], cache_dir=root / "owner-cache")
    check = check_against_peft(pulled, state["base"], state["adapters"], torch.float16)
    yield (
        f"max |logit difference| {check.max_diff:.2e} <= tolerance {check.tolerance:.2e} (two float16 ulps); "
        f"the merge moved the logits by {check.moved:.2f}"
    )
    if not check.ok:
        raise RuntimeError(f"logits differ from PEFT's: {check}")
