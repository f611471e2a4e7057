"""Benchmarks behind `radixfair bench ...`."""
