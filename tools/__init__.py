"""Developer tools: plots, benchmarks and scripts (not part of the installed packages)."""
