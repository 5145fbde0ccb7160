"""Benchmarks of the platform (run through `encore bench ...`); figures in docs/benchmarks.md."""
