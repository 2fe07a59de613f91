"""Training (communication-scheduling) policies: pure, shared by the simulator and the
runtime.

See docs/ARCHITECTURE.md.
"""
