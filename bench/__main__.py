"""``python -m bench``: run the benchmarks and write BENCHMARKS.md."""

import sys

from bench.runner import main

sys.exit(main())
