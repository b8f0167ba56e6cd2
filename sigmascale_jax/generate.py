"""`python -m sigmascale_jax.generate`: generate text with a dense or compressed model (`deploy/generate.py`).

    python -m sigmascale_jax.generate --model runs/smollm2-sigmascale-0.2 --chat \\
        --prompt "What is the capital of France?" --max-new-tokens 64

Imported, `sigmascale_jax.generate(params, cfg, prompt, max_new_tokens, key=...)` is the library function.
"""

from sigmascale_jax.deploy.generate import generate  # noqa: F401
from sigmascale_jax.errors import exit_on_interrupt, finish, make_callable, run_cli

if __name__ == "__main__":
    exit_on_interrupt("interrupted")
    from sigmascale_jax.deploy.generate import main

    finish(run_cli(main))
else:
    make_callable(__name__, generate)
