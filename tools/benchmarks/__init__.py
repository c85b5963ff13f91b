"""FCP benchmark suite B1-B7 (issue #8): each figure is a ratio against a same-run baseline.

Run everything with `python -m tools.benchmarks` (see `runner` for the options and
RESULTS.md for a full run on the project's machine).
"""
