"""``python -m deepcore.cli``: the ``deepcore`` command."""

import sys

from . import main

sys.exit(main())
