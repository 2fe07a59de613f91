"""Model specs and presets, the op graph of one training step, and the communication it
asks for.

See docs/ARCHITECTURE.md.
"""
