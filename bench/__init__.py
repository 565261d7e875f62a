"""Benchmarks of TokenFlow, run with `make bench`. See bench/README.md."""
