"""docs/ARCHITECTURE.md, contract 1: lina_sim.policies imports neither simpy nor torch, directly or not."""

import subprocess
import sys

import pytest

CHECK = """
import sys
import lina_sim.policies
from lina_sim.policies import registry
for name in registry.TRAINING_POLICIES:
    registry.training_policy_class(name)
for name in registry.PLACEMENT_POLICIES:
    registry.placement_policy_class(name)
import lina_sim.policies.path_estimator
{extra}
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('simpy', 'torch'))
print(','.join(bad))
"""


@pytest.mark.parametrize("extra", ["", "import lina_sim.workload.graph"])
def test_policies_import_neither_simpy_nor_torch(extra):
    out = subprocess.run([sys.executable, "-c", CHECK.format(extra=extra)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"policies pulled in {out.stdout.strip()}"
