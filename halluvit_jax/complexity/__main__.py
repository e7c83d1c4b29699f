"""`python -m halluvit_jax.complexity`: params and MACs table (see the package docstring)."""

import sys

from halluvit_jax.complexity import main

sys.exit(main())
