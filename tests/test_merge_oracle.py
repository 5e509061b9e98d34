"""The merge against its oracle: PEFT's merge_and_unload() on the same base and adapters, for every case the
issue names. Tensors must agree within one rounding to the output dtype, logits within 1e-3."""

from __future__ import annotations

import pytest
import torch
from support import assert_matches_peft

import hubmerge

ALL = ("embed_tokens", "lm_head")


def _case(models, name):
    if name == "vocab-extension-2023":
        base = models.base()
        return base, [models.adapter(base, layout="2023", modules_to_save=ALL, tokenizer="alpaca", seed=3)], None
    if name == "plus-recipe":
        base = models.base()
        return base, list(models.plus_recipe(base)), None
    if name == "rslora":
        base = models.base()
        return base, [models.adapter(base, r=8, alpha=16, use_rslora=True, seed=4)], None
    if name == "rank-alpha-patterns-regex":
        base = models.base()
        return (
            base,
            [
                models.adapter(
                    base,
                    r=8,
                    alpha=16,
                    target_modules=r".*\.(q_proj|v_proj|down_proj)",
                    rank_pattern={"v_proj": 4},
                    alpha_pattern={"down_proj": 7},
                    seed=5,
                )
            ],
            None,
        )
    if name == "fan_in_fan_out":
        base = models.base()
        return base, [models.adapter(base, layout="2023", fan_in_fan_out=True, seed=6)], None
    if name == "gqa":
        base = models.base(heads=4, kv_heads=2)
        return base, list(models.plus_recipe(base)), None
    if name == "sharded-bin":
        base = models.base(weights="bin", shards=3)
        return base, list(models.plus_recipe(base)), None
    if name == "bf16":
        base = models.base(dtype="bfloat16")
        return base, [models.adapter(base, modules_to_save=ALL, tokenizer="llama", dtype="bfloat16", seed=7)], None
    if name == "fp16-base-to-fp32":
        base = models.base()
        return base, list(models.plus_recipe(base)), "float32"
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    [
        "vocab-extension-2023",
        "plus-recipe",
        "rslora",
        "rank-alpha-patterns-regex",
        "fan_in_fan_out",
        "gqa",
        "sharded-bin",
        "bf16",
        "fp16-base-to-fp32",
    ],
)
def test_merge_matches_peft(models, tmp_path, name):
    base, adapters, dtype = _case(models, name)
    result = hubmerge.merge(adapters, base, tmp_path / "out", dtype=dtype, progress=False)
    want = {"float32": torch.float32, None: None}[dtype] or result.plan.base.dtype
    assert result.plan.dtype == want
    assert_matches_peft(result.folders["hf"], base, adapters, want)
