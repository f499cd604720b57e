"""``python -m spreading_jax COMMAND`` (see ``spreading_jax.cli``)."""
import sys

from spreading_jax.cli import main

sys.exit(main())
