"""Flower simulation runs, benchmarks and experiment sweeps."""
