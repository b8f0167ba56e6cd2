import sys

from sigmascale_jax.compress.cli import main
from sigmascale_jax.errors import run_cli

sys.exit(run_cli(main))
