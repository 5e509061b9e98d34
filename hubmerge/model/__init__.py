"""The model side: HF and Meta bases, LoRA adapters, tokenizers and the LLaMA name tables."""
