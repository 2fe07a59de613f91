"""The one timeline table, every printed result table, atomic files. Imports only
lina_sim.errors.

See docs/ARCHITECTURE.md.
"""
