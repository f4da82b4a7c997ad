"""``python -m fintensor ARGS`` is the ``fintensor`` command."""
from .cli import main

raise SystemExit(main())
