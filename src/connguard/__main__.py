"""``python -m connguard``: the same command line as the ``connguard`` script, for
environments where the script's directory is not on PATH."""

import sys

from connguard.cli import main

sys.exit(main())
