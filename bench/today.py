"""Today's path: the seed's merge script (Chinese-LLaMA-Alpaca's merge_llama_with_chinese_lora.py, HF output) on
current libraries, run by the benchmark in a child process:

load the whole base in fp16 with transformers, then for each adapter in order: load its tokenizer, resize the
embeddings to it, PeftModel.from_pretrained + merge_and_unload(); finally save_pretrained the model and tokenizer.
The script ends with os.sync() so that, like hubmerge (which fsyncs) and the floor (cp + sync), its time includes
getting the bytes onto the disk.

    python bench/today.py --base BASE --out OUT ADAPTER [ADAPTER ...]
"""

from __future__ import annotations

import argparse
import os
import warnings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapters", nargs="+")
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warnings.filterwarnings("ignore")  # PEFT's "Unexpected keyword arguments ['enable_lora', 'merge_weights']"
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float16)
    tokenizer = None
    for adapter in args.adapters:
        tokenizer = AutoTokenizer.from_pretrained(adapter)
        if model.get_input_embeddings().weight.size(0) != len(tokenizer):
            # mean_resizing=False: the new rows are replaced by the adapter's embed_tokens/lm_head anyway, and
            # transformers' default (sampling them from a multivariate normal, in fp16 on the CPU) takes more than
            # 15 minutes for the 1b shape's 17953 new rows: the 2023 script predates that default.
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = PeftModel.from_pretrained(model, adapter, dtype=torch.float16).merge_and_unload()
    tokenizer.save_pretrained(args.out)
    model.save_pretrained(args.out, max_shard_size="2GB")
    os.sync()


if __name__ == "__main__":
    main()
