"""GPU, link, host and cluster specs; topology; compute models; host-CPU sharing.

See docs/ARCHITECTURE.md.
"""
