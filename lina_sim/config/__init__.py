"""Scenarios, field declarations and checks, the YAML loader, byte sizes, cluster presets.
The lowest layer: imports only lina_sim.errors.

See docs/ARCHITECTURE.md.
"""
