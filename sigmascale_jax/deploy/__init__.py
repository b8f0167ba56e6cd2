"""Generation with a KV cache, and export to Hugging Face / PyTorch."""
