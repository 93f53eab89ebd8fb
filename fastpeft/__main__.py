"""`python -m fastpeft ...`: see fastpeft/cli.py."""

import sys

from fastpeft.cli import main

sys.exit(main())
