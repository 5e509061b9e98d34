"""Generate the benchmark's inputs without instantiating a model: a random LLaMA-shaped HF base (sharded
safetensors, or .bin torch zips, fp16, config.json, a real 32000-piece sentencepiece tokenizer) and
Chinese-LLaMA-style adapters in the 2023 layout (adapter_model.bin torch zip with the 2023 keys, adapter_config.json
of the PEFT 0.2/0.3 era, modules_to_save embed_tokens/lm_head at the extended vocabulary, the extended tokenizer).

Tensors are generated in row blocks and streamed out with hubmerge's own writers, so generating a 7B base needs
well under 1 GB of memory. Folders are written under a temporary name and renamed when complete, so an interrupted
generation is redone, a complete one reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import zlib
from pathlib import Path

import torch

from hubmerge.model.architectures import for_config
from hubmerge.tensorio import SafetensorsWriter, TorchZipWriter
from hubmerge.tensorio.source import Entry
from hubmerge.testing.tinymodels import LLAMA_LINEAR, make_tokenizer

from .shapes import BASE_VOCAB, LLAMA_EXTRA, SHAPES, AdapterSpec, Shape, input_folders

BLOCK_ELEMS = 16 * 2**20  # fp32 elements generated at once (64 MB)


def base_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of the base, in the order transformers saves them."""
    h, kv = shape.hidden, shape.kv_heads * (shape.hidden // shape.heads)
    by_module = {
        "q_proj": (h, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, h),
        "gate_proj": (shape.intermediate, h),
        "up_proj": (shape.intermediate, h),
        "down_proj": (h, shape.intermediate),
    }
    shapes = {}
    config = shape.config()
    for name in for_config(config, "bench").tensor_names(config):
        module = name.rsplit(".", 2)[-2]
        if module in by_module:
            shapes[name] = by_module[module]
        elif name.endswith("norm.weight"):
            shapes[name] = (h,)
        else:  # embed_tokens, lm_head
            shapes[name] = (BASE_VOCAB, h)
    return shapes


def _generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed * 2**32)


def _blocks(name: str, shape: tuple[int, ...], std: float, mean: float, seed: int):
    """Random fp16 rows of one tensor, ~BLOCK_ELEMS at a time (same name and seed, same values)."""
    gen = _generator(name, seed)
    row = 1 if len(shape) == 1 else shape[1]
    rows = shape[0] if len(shape) > 1 else 1
    step = max(1, BLOCK_ELEMS // row)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = torch.randn((n, row) if len(shape) > 1 else (shape[0],), generator=gen)
        yield block.mul_(std).add_(mean).to(torch.float16)


def _std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(std, mean): norms near 1, embeddings ~N(0, 1), linear layers ~N(0, 1/fan_in), as tinymodels does."""
    if len(shape) == 1:
        return 0.1, 1.0
    return (1.0 if "embed_tokens" in name else shape[1] ** -0.5), 0.0


def _stream(writer, entries: list[Entry], seed: int) -> None:
    for e in entries:
        std, mean = _std(e.name, e.shape)
        for block in _blocks(e.name, e.shape, std, mean, seed):
            writer.write(block)
    writer.close()


def _fresh(folder: Path) -> Path:
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def make_base(folder: Path, shape: Shape) -> Path:
    if (folder / "config.json").is_file():
        return folder
    tmp = _fresh(folder)
    make_tokenizer(tmp, "base", base_vocab=BASE_VOCAB)
    (tmp / "config.json").write_text(json.dumps(shape.config(), indent=2, sort_keys=True) + "\n")
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "5.24.0"}, indent=2) + "\n"
    )
    groups: list[list[Entry]] = [[]]
    size = 0
    for name, dims in base_shapes(shape).items():
        e = Entry(name, torch.float16, dims)
        if groups[-1] and size + e.nbytes > shape.shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    weight_map = {}
    bin_weights = shape.weights == "bin"  # the same tensors as torch zips, as transformers 4 saved them by default
    stem, ext = ("pytorch_model", "bin") if bin_weights else ("model", "safetensors")
    for k, entries in enumerate(groups):
        file = f"{stem}-{k + 1:05d}-of-{len(groups):05d}.{ext}"
        writer = (
            TorchZipWriter(tmp / file, entries)
            if bin_weights
            else SafetensorsWriter(tmp / file, entries, metadata={"format": "pt"})
        )
        _stream(writer, entries, seed=0)
        weight_map.update(dict.fromkeys((e.name for e in entries), file))
    total = sum(e.nbytes for g in groups for e in g)
    (tmp / f"{stem}.{ext}.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    tmp.rename(folder)
    return folder


def adapter_entries(shape: Shape, spec: AdapterSpec) -> list[Entry]:
    """The 2023 keys, in the order PEFT's state dict has them: embed_tokens, each layer's LoRA factors, lm_head."""
    base = base_shapes(shape)
    entries = [Entry("base_model.model.model.embed_tokens.weight", torch.float16, (spec.vocab, shape.hidden))]
    for i in range(shape.layers):
        for module in LLAMA_LINEAR:
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out_f, in_f = base[f"model.layers.{i}.{part}.{module}.weight"]
            key = f"base_model.model.model.layers.{i}.{part}.{module}"
            entries.append(Entry(f"{key}.lora_A.weight", torch.float16, (spec.r, in_f)))
            entries.append(Entry(f"{key}.lora_B.weight", torch.float16, (out_f, spec.r)))
    entries.append(Entry("base_model.model.lm_head.weight", torch.float16, (spec.vocab, shape.hidden)))
    return entries


def _adapter_std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    # lora_A ~ N(0, 1/in), lora_B ~ N(0, 0.02^2): scale * B @ A is ~20% of a weight at r=8, alpha=32.
    if "lora_A" in name:
        return shape[1] ** -0.5, 0.0
    if "lora_B" in name:
        return 0.02, 0.0
    return (1.0 if "embed_tokens" in name else shape[1] ** -0.5), 0.0


def make_adapter(folder: Path, shape: Shape, spec: AdapterSpec, seed: int) -> Path:
    if (folder / "adapter_config.json").is_file():
        return folder
    tmp = _fresh(folder)
    make_tokenizer(tmp, spec.kind, base_vocab=BASE_VOCAB, extra=LLAMA_EXTRA)
    entries = adapter_entries(shape, spec)
    writer = TorchZipWriter(tmp / "adapter_model.bin", entries)
    for e in entries:
        std, mean = _adapter_std(e.name, e.shape)
        for block in _blocks(e.name, e.shape, std, mean, seed):
            writer.write(block)
    writer.close()
    config = {  # the 2023 (PEFT 0.2/0.3) adapter_config.json of the Chinese-LLaMA-Alpaca releases
        "base_model_name_or_path": "decapoda-research/llama-7b-hf",
        "bias": "none",
        "enable_lora": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.05,
        "merge_weights": False,
        "modules_to_save": ["embed_tokens", "lm_head"],
        "peft_type": "LORA",
        "r": spec.r,
        "target_modules": list(LLAMA_LINEAR),
        "task_type": "CAUSAL_LM",
    }
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.rename(folder)
    return folder


def generate(work: Path, shape: Shape) -> tuple[Path, list[Path]]:
    """The base and adapter folders for ``shape`` under ``work/<shape>/`` (generated once, then reused)."""
    base, adapters = input_folders(work, shape)
    make_base(base, shape)
    for k, (spec, folder) in enumerate(zip(shape.adapters, adapters)):
        make_adapter(folder, shape, spec, seed=k + 1)
    return base, adapters


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gen", description="generate (or reuse) the benchmark's inputs")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work")
    p.add_argument("--shard-bytes", type=int, help="base shard size (default: the shape's)")
    p.add_argument("--base-format", choices=("safetensors", "bin"), default="safetensors", help="the base's shards")
    args = p.parse_args()
    shape = dataclasses.replace(SHAPES[args.shape], weights=args.base_format)
    if args.shard_bytes:
        shape = dataclasses.replace(shape, shard_bytes=args.shard_bytes)
    base, adapters = generate(args.work, shape)
    print(base, *adapters)


if __name__ == "__main__":
    main()
