"""`python -m hellochat_jax.cli ...`: the `hellochat` command without its console script."""

import sys

from hellochat_jax.cli import main

sys.exit(main())
