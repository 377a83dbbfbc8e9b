"""lipgan: Lipschitz-constrained networks, WGANs, and the measurements that go with them.

The everyday analysis calls are available at the top level and imported on first use, so that
``import lipgan`` stays light: ``lipgan.estimate``, ``lipgan.layer_table``,
``lipgan.upper_bounds``, ``lipgan.lower_bounds``, ``lipgan.layer_bound``,
``lipgan.LipschitzReport`` (see docs/analysis.md).
"""

from lipgan.errors import LipganError

__all__ = [
    "LipganError",
    "__version__",
    "estimate",
    "layer_table",
    "upper_bounds",
    "lower_bounds",
    "layer_bound",
    "LipschitzReport",
]
__version__ = "0.1.0"

_LAZY = {
    "estimate": "lipgan.analysis.report",
    "layer_table": "lipgan.analysis.report",
    "upper_bounds": "lipgan.analysis.report",
    "LipschitzReport": "lipgan.analysis.report",
    "lower_bounds": "lipgan.analysis.lower",
    "layer_bound": "lipgan.analysis.operators",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lipgan' has no attribute {name!r}")
