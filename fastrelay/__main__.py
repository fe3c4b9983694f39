"""`python -m fastrelay`: the same as the `fastrelay` command."""

import sys

from fastrelay.cli import main

sys.exit(main())
