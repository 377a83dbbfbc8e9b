"""Layer-level building blocks of the Lipschitz methods.

- :class:`SpectralNormParametrization` and :func:`spectral_norm`: ``W -> W / sigma(W)`` as a
  ``torch.nn.utils.parametrize`` parametrization, with sigma either the reshaped-kernel norm of
  SN-GAN (Miyato et al. 2018) or the layer's true operator norm (power iteration on the conv
  operator itself). The power-iteration vectors ``u`` and ``v`` are buffers (in the state_dict).
- :func:`bjorck_orthonormalize`, :class:`BjorckOrthonormal` and :class:`BjorckLinear`: weights
  made orthonormal by Björck iterations (Anil, Lucas & Grosse 2019, "Sorting out Lipschitz
  function approximation").
- :class:`GroupSort`: the gradient-norm-preserving activation of the same paper.

The code lives in ``lipgan.layers.weights``, ``spectral``, ``orthonormal`` and ``activations``;
every public name is importable from ``lipgan.layers``.
"""

from lipgan.layers.activations import GroupSort, groupsort_activations
from lipgan.layers.orthonormal import (
    BjorckLinear,
    BjorckOrthonormal,
    bjorck_orthonormalize,
)
from lipgan.layers.spectral import (
    SpectralNormParametrization,
    converge_spectral_norms,
    spectral_norm,
    spectral_norm_parametrizations,
)
from lipgan.layers.weights import WEIGHT_LAYERS, reshaped_weight, weight_layers

__all__ = [
    "WEIGHT_LAYERS",
    "weight_layers",
    "reshaped_weight",
    "SpectralNormParametrization",
    "spectral_norm",
    "converge_spectral_norms",
    "spectral_norm_parametrizations",
    "bjorck_orthonormalize",
    "BjorckOrthonormal",
    "BjorckLinear",
    "GroupSort",
    "groupsort_activations",
]
