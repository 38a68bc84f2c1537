"""Benchmark harnesses of this repository (not shipped in the `bilevel_rlhf` wheel); run them with
`python scripts/benchmark.py`."""
