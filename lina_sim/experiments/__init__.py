"""Sweeps, the scenario-kind registry, reproduce, compare, and collective micro-benchmarks.

See docs/ARCHITECTURE.md.
"""
