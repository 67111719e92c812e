"""Benchmarks run by hand (`python -m bench.<name>`); not imported by the pipeline."""
