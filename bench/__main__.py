"""``python -m bench`` runs the whole suite (see :mod:`bench.run`)."""

import sys

from bench.run import main

sys.exit(main())
