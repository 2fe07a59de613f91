"""Inference serving: requests and batching, the cost model, the per-policy server,
lockstep runs.

See docs/ARCHITECTURE.md.
"""
