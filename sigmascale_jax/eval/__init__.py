"""Evaluate a model: perplexity (WikiText-2, C4) and zero-shot accuracy (lm-evaluation-harness tasks).

`python -m sigmascale_jax.eval --model M --tasks wikitext2,c4`; in Python, `evaluate(...)`
(`cli.py`), `perplexity.perplexity(params, cfg, windows)`, `zeroshot.score_task(...)`.
"""

from sigmascale_jax.eval.cli import evaluate, main  # noqa: F401
