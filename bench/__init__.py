"""Benchmarks: scripts that print figures and ratios measured side by side in one run.

``python -m bench.all`` runs them and writes the generated part of BENCHMARKS.md. Speed and
memory targets live here, never in timed tests.
"""
