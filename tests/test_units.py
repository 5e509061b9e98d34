"""Fast in-process tests of the three core steps, each against an independent computation: reading an adapter
(open_adapter), planning (build_plan) and the streaming merge (merge_blocks)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hubmerge.errors import IncompatibleError
from hubmerge.merging import BufferPool, merge_blocks
from hubmerge.model.adapters import open_adapter
from hubmerge.model.loader import open_base
from hubmerge.plan import build_plan


def _adapter_tensors(folder):
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        return load_file(weights)
    return torch.load(folder / "adapter_model.bin", weights_only=True)


def test_open_adapter_reads_rank_alpha_and_scale_from_both_layouts(models):
    base = models.base()
    for layout, r, alpha, rslora in (("2023", 8, 32, False), ("current", 16, 32, False), ("current", 4, 8, True)):
        folder = models.adapter(base, layout=layout, r=r, alpha=alpha, use_rslora=rslora, seed=71)
        adapter = open_adapter(folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        raw = _adapter_tensors(folder)
        a_keys = [k for k in raw if "lora_A" in k]
        assert adapter.layout == layout and adapter.r == r == config["r"]
        assert len(adapter.lora) == len(a_keys) > 0  # one pair per adapted module, none invented or lost
        want = alpha / math.sqrt(r) if rslora else alpha / r
        assert {round(p.scale, 9) for p in adapter.lora.values()} == {round(want, 9)}
        for pair in adapter.lora.values():
            assert pair.A.shape[0] == r and pair.B.shape[1] == r


def test_build_plan_orders_terms_extends_vocab_and_refuses_the_reversed_plus_order(models):
    base_dir = models.base()
    llama, alpaca = models.plus_recipe(base_dir)
    base = open_base(base_dir)
    first, second = open_adapter(llama), open_adapter(alpaca)
    plan = build_plan(base, [first, second])
    assert plan.vocab_size == second.vocab_size > base.vocab_size
    assert [t.name for t in plan.tensors][0] == "model.embed_tokens.weight"
    q = next(t for t in plan.tensors if t.name.endswith("layers.0.self_attn.q_proj.weight"))
    assert [term.adapter for term in q.terms] == [0, 1]  # both deltas, in the order given
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert embed.origin == second.label and not embed.terms  # replaced whole by the last adapter
    with pytest.raises(IncompatibleError, match="reverse|order"):
        build_plan(base, [second, first])


def test_build_plan_puts_tensors_read_whole_from_an_adapter_first(models):
    # they need nothing from the base: a streamed push writes and uploads them while the base's first shard downloads
    base_dir = models.base()
    llama, alpaca = models.plus_recipe(base_dir)
    base = open_base(base_dir)
    plan = build_plan(base, [open_adapter(llama), open_adapter(alpaca)])
    whole = [t.origin != "base" for t in plan.tensors]
    k = whole.index(False)
    assert all(whole[:k]) and not any(whole[k:])  # one run of them, first
    assert {t.name for t in plan.tensors[:k]} == {"model.embed_tokens.weight", "lm_head.weight"}
    rest = [n for n in base.arch.tensor_names(plan.config) if n not in {t.name for t in plan.tensors[:k]}]
    assert [t.name for t in plan.tensors[k:]] == rest  # the others keep the architecture's order
    plain = build_plan(base, [open_adapter(models.adapter(base_dir, seed=73))])
    assert [t.name for t in plain.tensors] == base.arch.tensor_names(plain.config)


def test_merge_blocks_equals_w_plus_scaled_ba_computed_directly(models):
    base_dir = models.base()
    adapter_dir = models.adapter(base_dir, r=8, alpha=16, seed=72, dtype="float32")
    plan = build_plan(open_base(base_dir), [open_adapter(adapter_dir)], "float32")
    small = 4096  # bytes per block: forces several blocks per tensor
    pool = BufferPool(4)
    pieces: dict[str, list[torch.Tensor]] = {}
    for block in merge_blocks(plan, small, pool=pool):
        pieces.setdefault(block.name, []).append(block.data.clone())
        pool.give(block.buffer)
    assert any(len(p) > 1 for p in pieces.values())

    weights = load_file(next(base_dir.glob("*.safetensors")))
    lora = _adapter_tensors(adapter_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    a = next(v for k, v in lora.items() if "layers.1.mlp.down_proj.lora_A" in k).float()
    b = next(v for k, v in lora.items() if "layers.1.mlp.down_proj.lora_B" in k).float()
    expected = weights[name].float() + (16 / 8) * (b @ a)
    merged = torch.cat(pieces[name])
    assert torch.allclose(merged, expected, rtol=1e-5, atol=1e-6)
    untouched = "model.layers.1.input_layernorm.weight"
    assert torch.equal(torch.cat(pieces[untouched]), weights[untouched].float())

    skipped = {0, 1}  # tensors an interrupted run already wrote are neither read nor yielded
    names = {block.index for block in merge_blocks(plan, small, skip=skipped)}
    assert names == set(range(len(plan.tensors))) - skipped


def test_hf_writer_hands_over_each_shard_as_soon_as_its_last_byte_is_written(models, tmp_path):
    # (a streamed push uploads it then, instead of when the next shard's first block arrives)
    from hubmerge.output.writers.hf import HFWriter

    plan = build_plan(open_base(models.base()), [open_adapter(models.adapter(models.base(), seed=74))])
    writer = HFWriter(tmp_path, plan, max_shard_size=60_000)
    events: list[tuple[str, str]] = []
    writer.on_file_done = lambda path, digest: events.append(("done", path.name))
    for block in merge_blocks(plan, 4096):
        events.append(("block", block.name))
        writer.write(block)
    events.append(("close", ""))
    writer.close()
    shard_of = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shard_of.values())) >= 3
    for i, (kind, name) in enumerate(events):
        if kind == "done":  # right after the last block of that shard, before anything else
            assert events[i - 1][0] == "block" and shard_of[events[i - 1][1]] == name
            assert all(shard_of[n] != name for k, n in events[i + 1 :] if k == "block")
    assert [n for k, n in events if k == "done"] == writer.shard_names  # every shard, in order, before close
    assert events[-1] == ("close", "")
