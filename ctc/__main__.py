"""``python -m ctc``: the ``ctc`` command line (where the console script is not installed)."""

import sys

from ctc.cli import main

sys.exit(main())
