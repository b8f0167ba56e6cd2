"""The decoder: its config, the pure forward pass (and an NNX module), the projection leaves, the KV cache."""
