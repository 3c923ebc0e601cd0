"""``python -m pipeline`` is the ``pipeline`` command."""

import sys

from ._cli import main

sys.exit(main())
