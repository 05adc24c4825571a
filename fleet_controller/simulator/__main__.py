"""`python -m fleet_controller.simulator --config sim.toml`."""

import sys

from fleet_controller.simulator.cli import main

sys.exit(main())
