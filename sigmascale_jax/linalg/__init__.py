"""Linear algebra the methods share: whitening, rank-k factors and losses, truncation with a cut-only VJP, batching."""
