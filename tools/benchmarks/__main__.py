"""Entry point of `python -m tools.benchmarks` (see `runner`)."""

import sys

from tools.benchmarks import runner

if __name__ == "__main__":
    sys.exit(runner.main())
