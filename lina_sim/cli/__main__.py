"""``python -m lina_sim.cli``: the ``lina-sim`` command."""

import sys

from lina_sim.cli.main import main

sys.exit(main())
