"""python -m bench: the benchmark suite (bench/suite.py, docs/performance.md)."""

import sys

from bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
