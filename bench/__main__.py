"""``python -m bench``: run the benchmark suite and write its report (see bench/cli.py)."""

from .cli import main

raise SystemExit(main())
