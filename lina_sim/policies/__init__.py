"""Pure decision objects shared by the simulator's engine and the real runtime.

Contract (docs/ARCHITECTURE.md, contract 1): nothing under ``lina_sim.policies`` imports simpy or torch.
Policies see plain data (requests, counts, specs) and return decisions. Look policies
up by name with ``lina_sim.policies.registry``.
"""
