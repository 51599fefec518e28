"""``python -m ditaccel ...``: the ``ditaccel`` command without its console script."""

from .cli import main

raise SystemExit(main())
