"""Shared test helpers: a cache of tiny real-format models, readers that follow other tools' rules (llama.cpp's
joining of pth shards), the PEFT oracle comparison, and a spy on the real code."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hubmerge.testing import tinymodels as tm

# Our merge and PEFT's agree in fp32 up to summation order, so after the one cast they differ by one ulp at most.
ULP = tm.ULP


# The repos the session's local Hub (conftest's ``hub`` fixture) publishes.
LLAMA_REPO, ALPACA_REPO, BASE_REPO = "hfl/llama-plus-tiny", "hfl/alpaca-plus-tiny", "alice/llama-tiny-hf"


class ModelCache:
    """Builds tiny models once per test session, keyed by the recipe that made them."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Path] = {}
        self._serial = itertools.count()  # never reuse a folder name, even after a failed build

    def _key(self, kind: str, kw: dict[str, Any]) -> str:
        return kind + "-" + json.dumps({k: str(v) for k, v in sorted(kw.items())}, sort_keys=True)

    def base(self, **kw: Any) -> Path:
        key = self._key("base", kw)
        if key not in self._built:
            self._built[key] = tm.make_base(self.root / f"base{next(self._serial)}", **kw)
        return self._built[key]

    def adapter(self, base: Path, **kw: Any) -> Path:
        key = self._key("adapter", {"base": base, **kw})
        if key not in self._built:
            self._built[key] = tm.make_adapter(self.root / f"adapter{next(self._serial)}", base, **kw)
        return self._built[key]

    def plus_recipe(self, base: Path) -> tuple[Path, Path]:
        """(llama-plus-like, alpaca-plus-like): 2023 layout r=8 then current layout r=16, both extending the vocab."""
        llama, alpaca = (self.adapter(base, **recipe, seed=seed) for recipe, seed in zip(tm.PLUS_RECIPE, (11, 12)))
        return llama, alpaca

    def copy(self, src: Path, name: str) -> Path:
        """A private copy of a built folder, for tests that damage it."""
        dst = self.root / "copies" / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        return dst


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF safetensors folder, read with the safetensors package."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def read_pth_like_llamacpp(folder: Path) -> dict[str, torch.Tensor]:
    """Join consolidated.NN.pth shards as llama.cpp's converter does: tok_embeddings, wo and w2 along axis 1,
    every other tensor of 2+ dims along axis 0, 1-D tensors from shard 0."""
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in sorted(folder.glob("consolidated.*.pth"))]
    joined = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        if parts[0].dim() == 1:
            joined[name] = parts[0]
        elif name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            joined[name] = torch.cat(parts, dim=1)
        else:
            joined[name] = torch.cat(parts, dim=0)
    return joined


def meta_to_hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """docs/formats.md's Meta->HF rotary permute, written out here independently of hubmerge.model.layouts."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def assert_matches_peft(out_hf: Path, base: Path, adapters: Sequence[Path], dtype: torch.dtype) -> None:
    """The oracle: hubmerge's HF output against PEFT's merge_and_unload() of the same inputs.

    Tensors: PEFT merges in fp32; cast once to ``dtype``, its weights must equal ours within one ulp (a single
    rounding; fp32 summation order decides the rare ties) and be bit-identical almost everywhere.
    Logits: :func:`hubmerge.testing.tinymodels.check_against_peft` (two ulps of the largest logit; the merge itself must
    move the logits by ten times more, or the comparison would prove nothing).
    """
    ref = tm.peft_merged_model(base, adapters, dtype=torch.float32)
    ours = hf_tensors(out_hf)
    ref_state = ref.state_dict()
    if "lm_head.weight" not in ours and ref.config.tie_word_embeddings:  # a tied head is saved as the embedding
        assert torch.equal(ref_state.pop("lm_head.weight"), ref_state["model.embed_tokens.weight"])
    assert set(ours) == set(ref_state), set(ours) ^ set(ref_state)
    differing = 0
    for name, want in ref_state.items():
        got = ours[name]
        assert got.dtype == dtype, (name, got.dtype)
        cast = want.to(dtype)
        torch.testing.assert_close(got.float(), cast.float(), rtol=ULP[dtype], atol=1e-7, msg=name)
        differing += int((got != cast).sum())
    assert differing <= 1e-3 * sum(t.numel() for t in ours.values()), differing
    check = tm.check_against_peft(out_hf, base, adapters, dtype)
    assert check.max_diff <= check.tolerance, check
    assert check.moved > 10 * check.tolerance, f"the adapters should change the logits measurably: {check}"


def spy(monkeypatch, owner: Any, name: str, note: Callable[..., object]) -> None:
    """Make ``owner.name`` (a function, or a method with its ``self``) tell ``note`` its arguments before it runs as
    it always does: the real code does the work, the test sees what it was asked."""
    real = getattr(owner, name)

    def noted(*args, **kwargs):
        note(*args, **kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, noted)


def no_partial_left(out: Path) -> bool:
    """True when neither ``out`` nor any staging sibling exists."""
    return not out.exists() and not any(out.parent.glob(f".{out.name}.hubmerge-*"))


def cli_command(*args) -> list[str]:
    """The ``hubmerge`` command line as a user types it, run as a separate process of this interpreter."""
    return [sys.executable, "-m", "hubmerge.cli", *map(str, args)]


def cli(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run ``hubmerge ARGS...`` to completion, capturing its output as text (``kw`` as for subprocess.run)."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout, **kw)


def hubmerge(hub, tmp_path, *args, token="alice", cache="cache", env=None, **kw):
    """Run the CLI as a user would, with its own HF home (no saved login) and a fresh cache by default (none with
    ``cache=None``); ``env`` adds variables, ``kw`` goes to subprocess.run (e.g. ``preexec_fn``)."""
    full = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        **(env or {}),
    }
    full.pop("HF_TOKEN", None)
    if token:
        full["HF_TOKEN"] = hub.tokens.get(token, token)
    if cache and args and args[0] not in ("demo",):
        args = (*args, "--cache-dir", tmp_path / cache)
    return cli(*args, env=full, **kw)


def one_line_error(done) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    return lines[0]
