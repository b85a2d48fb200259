"""``python -m lockfs``: the same as the ``lockfs`` command."""

import sys

from lockfs.cli import main

sys.exit(main())
