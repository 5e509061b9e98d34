"""Meta / llama.cpp consolidated layout: ``consolidated.NN.pth`` model-parallel shards, ``params.json``,
``tokenizer.model`` (and ``added_tokens.json`` when tokens sit on top of it). No config.json or safetensors here:
llama.cpp's converter would prefer them over the .pth files.

All shards are written at once, each block going to the shards that hold its rows or columns, so the merge still
makes a single pass over the weights.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import IncompatibleError
from ...merging import Block
from ...model import layouts
from ...model.architectures import DEFAULT_ROPE_THETA, rope_parameters
from ...model.tokenizer import CONFIG_ONLY_FILES
from ...plan import MergePlan
from ...tensorio import TorchZipWriter
from ...tensorio.source import Entry
from ...verification.known import known_hashes
from .base import Writer


def write_side_file(folder: Path, name: str, source: Path | dict[str, Any]) -> Path:
    """Write a side file of :meth:`~hubmerge.plan.MergePlan.side_files` into ``folder``: copied, or dumped as JSON."""
    path = folder / name
    if isinstance(source, Path):
        shutil.copyfile(source, path)
    else:
        path.write_text(json.dumps(source, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def default_shards(hidden_size: int) -> int:
    """The model-parallel shard count Meta's release of this hidden size used (the releases table of
    known_hashes.json: 7B 1, 13B 2, 33B 4, 65B/70B 8); 1 for sizes it never shipped."""
    return next((r["shards"] for r in known_hashes()["releases"] if r["params"]["dim"] == hidden_size), 1)


def split_sizes(total: int, parts: int) -> list[int]:
    """Split ``total`` rows into ``parts`` nearly equal counts, the larger ones last (49953 -> [24976, 24977])."""
    small, extra = divmod(total, parts)
    return [small + (k >= parts - extra) for k in range(parts)]


def ffn_params(dim: int, intermediate: int) -> dict[str, Any]:
    """``multiple_of`` (and ``ffn_dim_multiplier`` when needed) that make Meta's FFN size formula give
    ``intermediate``: multiple_of * ceil(int(f * int(8 * dim / 3)) / multiple_of)."""
    base = int(2 * 4 * dim / 3)
    size = functools.partial(layouts.ffn_hidden_size, dim)
    multiples = (4096, 1024, 256, 128, 64, 32, 16, 8, 4, 2, 1)
    for m in multiples[2:]:
        if size(m, None) == intermediate:
            return {"multiple_of": m}
    for m in multiples:
        for f in [round(intermediate / base, k) for k in range(1, 7)] + [(intermediate + 0.5) / base]:
            if size(m, f) == intermediate:
                return {"multiple_of": m, "ffn_dim_multiplier": f}
    raise IncompatibleError(f"intermediate_size {intermediate} cannot be expressed in Meta's params.json")


def params_json(plan: MergePlan) -> dict[str, Any]:
    """params.json with real values (vocab_size included: old converters choke on -1)."""
    c = plan.config
    params: dict[str, Any] = {
        "dim": int(c["hidden_size"]),
        "n_layers": int(c["num_hidden_layers"]),
        "n_heads": plan.base.num_heads,
    }
    if plan.base.num_kv_heads != plan.base.num_heads:
        params["n_kv_heads"] = plan.base.num_kv_heads
    params.update(ffn_params(params["dim"], int(c["intermediate_size"])))
    params["norm_eps"] = float(c.get("rms_norm_eps", 1e-6))
    theta = rope_parameters(c)["rope_theta"]
    if theta != DEFAULT_ROPE_THETA:
        params["rope_theta"] = theta
    params["vocab_size"] = plan.vocab_size
    return params


@dataclass
class _Route:
    meta_name: str
    split: int | None  # dim split across shards, or None for a full copy in each
    heads: int | None  # rotary head count when the rows must be permuted
    bounds: list[int]  # dim-0 splits: row where each shard starts (+ total)


class MetaWriter(Writer):
    """Writes the consolidated layout in ``shards`` model-parallel files (see :func:`default_shards`)."""

    def __init__(self, folder: Path, plan: MergePlan, shards: int | None = None):
        self.folder, self.plan = Path(folder), plan
        arch = plan.base.arch
        if not arch.pth:
            raise IncompatibleError(
                f"the pth format (Meta's checkpoint layout) is LLaMA-only and this is a {arch.name} model; "
                "use --format hf or gguf",
                remedy="format",
            )
        rope = rope_parameters(plan.config)["rope_type"]
        if rope != "default":
            raise IncompatibleError(
                f"rope scaling {rope!r} has no place in Meta's params.json; use --format hf or gguf", remedy="format"
            )
        n = shards or default_shards(plan.base.hidden_size)
        self.shards = n
        if plan.tokenizer.model_file is None:
            raise IncompatibleError(
                f"{plan.tokenizer.folder}: the pth format needs tokenizer.model, this tokenizer "
                "has only tokenizer.json; use --format hf"
            )
        self._tokenizer_model: Path = plan.tokenizer.model_file
        for what, value in (
            ("attention heads", plan.base.num_heads),
            ("kv heads", plan.base.num_kv_heads),
            ("hidden size", plan.base.hidden_size),
            ("intermediate size", int(plan.config["intermediate_size"])),
        ):
            if value % n:
                raise IncompatibleError(
                    f"cannot split {value} {what} into {n} pth shards; choose a --pth-shards count that divides it"
                )
        self._routes: list[_Route] = []
        per_shard: list[list[Entry]] = [[] for _ in range(n)]
        for t in plan.tensors:
            found = arch.meta_name(t.name)
            if found is None:
                raise IncompatibleError(f"{t.name} has no place in Meta's layout (it has no biases); use --format hf")
            meta_name, split = found
            route = _Route(meta_name, split, arch.rotary_heads(t.name, plan.config), [])
            dtype = plan.out_dtype(t)
            if split is None:
                shapes = [t.shape] * n
            elif split == 0:
                sizes = split_sizes(t.shape[0], n)
                route.bounds = [sum(sizes[:k]) for k in range(n + 1)]
                shapes = [(s, *t.shape[1:]) for s in sizes]
            else:
                shapes = [(t.shape[0], t.shape[1] // n)] * n
            for k in range(n):
                per_shard[k].append(Entry(route.meta_name, dtype, shapes[k]))
            self._routes.append(route)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._writers = [TorchZipWriter(self.folder / f"consolidated.{k:02d}.pth", per_shard[k]) for k in range(n)]

    def write(self, block: Block) -> None:
        route = self._routes[block.index]
        data = block.data
        if route.heads is not None:
            data = layouts.hf_to_meta_rows(data, self.plan.base.head_dim)
        if route.split is None:
            for w in self._writers:
                w.write(data)
        elif route.split == 1:
            cols = data.shape[1] // self.shards
            for k, w in enumerate(self._writers):
                w.write(data[:, k * cols : (k + 1) * cols])
        else:
            start, stop = block.start, block.start + data.shape[0]
            for k, w in enumerate(self._writers):
                lo, hi = max(start, route.bounds[k]), min(stop, route.bounds[k + 1])
                if lo < hi:
                    w.write(data[lo - start : hi - start])

    def close(self) -> list[Path]:
        for w in self._writers:
            w.close()
        files = [w.path for w in self._writers]
        params = self.folder / "params.json"
        params.write_text(json.dumps(params_json(self.plan), indent=2) + "\n", encoding="utf-8")
        files.append(params)
        tokenizer = self.folder / "tokenizer.model"
        shutil.copyfile(self._tokenizer_model, tokenizer)
        files.append(tokenizer)
        if self.plan.tokenizer.added:
            added = self.folder / "added_tokens.json"
            ordered = dict(sorted(self.plan.tokenizer.added.items(), key=lambda kv: kv[1]))
            added.write_text(json.dumps(ordered, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            files.append(added)
        # llama.cpp's legacy converter reads the special tokens and add_bos/add_eos from these, beside the .pth
        for name, source in self.plan.side_files().items():
            if name in CONFIG_ONLY_FILES:
                files.append(write_side_file(self.folder, name, source))
        return files

    def describe(self) -> dict:
        return {"shards": self.shards}

    def digests(self) -> dict[Path, str]:
        """SHA256 of the consolidated.NN.pth files, computed while writing them (after close)."""
        return {w.path: w.sha256 for w in self._writers if w.sha256}

    def abort(self) -> None:
        for w in self._writers:
            w.abort()
