"""python -m dev.benchmarks: the benchmark's command line (cli)."""

import sys

from .cli import main

sys.exit(main())
