"""The training engine, launch plans, breakdowns, and a training scenario run per policy.

See docs/ARCHITECTURE.md.
"""
