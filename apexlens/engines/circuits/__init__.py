"""The circuit engine: a hypothesis (edges kept, every other edge ablated) evaluated exactly.

* :mod:`~apexlens.engines.circuits.buffer` -- the sender buffer and exclusion plans;
* :mod:`~apexlens.engines.circuits.plan` -- a keep-matrix planned once into hooks;
* :mod:`~apexlens.engines.circuits.evaluate` -- one hypothesis or many, per-example values;
* :mod:`~apexlens.engines.circuits.resume` -- a pass resumed from the first block a
  hypothesis changes against the last one (the workbench's toggle; bit-for-bit the same).
"""

from apexlens.engines.circuits.evaluate import (
    CircuitValues,
    circuit_final,
    circuit_rows,
    evaluate,
    scratch_of,
)
from apexlens.engines.circuits.plan import CircuitPlan

__all__ = [
    "CircuitPlan",
    "CircuitValues",
    "circuit_final",
    "circuit_rows",
    "evaluate",
    "scratch_of",
]
