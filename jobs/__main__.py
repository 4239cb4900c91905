"""``python -m jobs``: the command line."""

from jobs.cli import main

raise SystemExit(main())
