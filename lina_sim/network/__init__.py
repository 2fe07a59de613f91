"""The fluid max-min network, collectives as flow steps, alone-times, serving all-to-all
timing.

See docs/ARCHITECTURE.md.
"""
