"""Benchmarks (`make bench`): not part of the installed package; run from the repo root as `python -m bench.X`."""
