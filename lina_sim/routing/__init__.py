"""Expert-routing traces: format and importers, statistics, a generator fitted to real
traces.

See docs/ARCHITECTURE.md.
"""
