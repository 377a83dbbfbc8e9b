"""lipgan: Lipschitz-constrained networks, WGANs, and the measurements that go with them."""

from lipgan.errors import LipganError

__all__ = ["LipganError", "__version__"]
__version__ = "0.1.0"
