"""The OpenAI-compatible simulator that stands in for Heroku Managed Inference off Heroku.

* :mod:`~devstack.simulator.core`: :class:`Simulator`, its config and faults;
* :mod:`~devstack.simulator.limits`: request parsing, the strict sliding window, replies;
* :mod:`~devstack.simulator.calls`: the record of every call and the stats;
* :mod:`~devstack.simulator.server`: the HTTP server around a simulator;
* ``python -m devstack.simulator``: one in the foreground (:mod:`~devstack.simulator.__main__`).

Its answers, latencies and token counts are simulated, never Kimi K2.5's.
"""

from devstack.simulator.calls import SimCall, SimulatorStats
from devstack.simulator.core import Faults, Simulator, SimulatorConfig

__all__ = ["Faults", "SimCall", "Simulator", "SimulatorConfig", "SimulatorStats"]
