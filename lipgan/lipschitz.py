"""Lipschitz constants of whole networks: a per-layer table, upper bounds, lower bounds, the gap.

The implementation lives in :mod:`lipgan.analysis` (graph composition in ``graph``, chain bounds
in ``chain``, LipSDP in ``lipsdp``, lower bounds in ``lower``, the report in ``report``); this
module keeps the public names importable from ``lipgan.lipschitz``. See docs/analysis.md.
"""

from lipgan.analysis.lipsdp import lipsdp_neuron, lipsdp_neuron_cvxpy
from lipgan.analysis.lower import jacobian_norm, lower_bounds
from lipgan.analysis.report import (
    LipschitzReport,
    UnsoundBoundError,
    estimate,
    layer_table,
    upper_bounds,
)

__all__ = [
    "LipschitzReport",
    "UnsoundBoundError",
    "layer_table",
    "estimate",
    "upper_bounds",
    "lower_bounds",
    "lipsdp_neuron",
    "lipsdp_neuron_cvxpy",
    "jacobian_norm",
]
