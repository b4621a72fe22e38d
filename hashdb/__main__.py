"""``python -m hashdb``: the same as the ``hashdb`` command."""

import sys

from .cli import main

sys.exit(main())
