"""``python -m audiotok``: the ``audiotok`` command line."""

import sys

from .cli import main

sys.exit(main())
