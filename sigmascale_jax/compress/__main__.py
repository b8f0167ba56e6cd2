from sigmascale_jax.errors import exit_on_interrupt, finish, run_cli

# First, so that Ctrl-C in the first seconds (while JAX loads) is handled too.
exit_on_interrupt("interrupted; rerun the same command (without --overwrite) to resume where it stopped")

from sigmascale_jax.compress.cli import main  # noqa: E402

finish(run_cli(main))
