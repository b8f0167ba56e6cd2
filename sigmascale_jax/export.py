"""`python -m sigmascale_jax.export`: a (compressed) model as a Hugging Face folder (`deploy/export.py`).

    python -m sigmascale_jax.export --model runs/smollm2-sigmascale-0.2 --out exports/factored --format factored

Imported, `sigmascale_jax.export(params, cfg, tokenizer, out, fmt)` writes in-memory params (`export_params`).
"""

from sigmascale_jax.deploy.export import export_params  # noqa: F401
from sigmascale_jax.errors import exit_on_interrupt, finish, make_callable, run_cli

if __name__ == "__main__":
    exit_on_interrupt("interrupted")
    from sigmascale_jax.deploy.export import main

    finish(run_cli(main))
else:
    make_callable(__name__, export_params)
