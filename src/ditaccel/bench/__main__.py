"""``python -m ditaccel.bench ...``: the same command as ``ditaccel bench ...``."""

import sys

from .command import main

sys.exit(main())
