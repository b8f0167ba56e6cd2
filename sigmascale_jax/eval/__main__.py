from sigmascale_jax.errors import exit_on_interrupt, finish, run_cli

exit_on_interrupt("interrupted")

from sigmascale_jax.eval.cli import main  # noqa: E402

finish(run_cli(main))
