"""``python -m deepcore``: the ``deepcore`` command (see :mod:`deepcore.cli`)."""

import sys

from .cli import main

sys.exit(main())
