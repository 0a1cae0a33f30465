"""``python -m fastload``: the ``fastload`` command."""

import sys

from .cli import main

sys.exit(main())
