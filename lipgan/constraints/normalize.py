"""Normalized weights: spectral normalization and Bjorck orthonormalization."""

from __future__ import annotations

import warnings

from torch import nn

from lipgan import layers as _layers
from lipgan.constraints.base import Constraint, register
from lipgan.errors import LipganError


class _Normalized(Constraint):
    """A method whose layers carry power-iteration parametrizations: each optimizer step lets
    their next training forward iterate; :meth:`finalize` converges them (``converge``)."""

    def after_step(self, module: nn.Module) -> None:
        for p in _layers.spectral_norm_parametrizations(module):
            p.mark_stale()

    def finalize(self, module: nn.Module) -> None:
        self.converge(module)

    def converge(self, module: nn.Module) -> None:  # pragma: no cover - both subclasses define it
        raise NotImplementedError


@register("spectral-norm")
class SpectralNorm(_Normalized):
    """Spectral normalization of every Linear/Conv/ConvTranspose layer: ``W -> W / sigma``.

    ``mode="reshaped"`` (SN-GAN, Miyato et al. 2018): sigma of the reshaped kernel
    ``(c_out, c_in k k)``; a conv layer's true operator norm can exceed 1.
    ``mode="operator"``: sigma is the layer's operator norm, by power iteration on the conv
    operator itself, so during training each layer is at most 1-Lipschitz up to the power
    iteration's convergence; after :meth:`converge` it is at most 1-Lipschitz, certified: every
    layer divides by a certified upper bound of its norm (exact from the dense map for small
    layers, the exact FFT norm for full circular convs, the Gram-iteration bound otherwise)
    until the next training step. A conv layer's input shape is learned at its first forward
    call (a forward pre-hook); its weight cannot be read before that.

    A torch parametrization (``torch.nn.utils.parametrize``): ``u`` and ``v`` are buffers in the
    state_dict. 15 iterations at attach (torch's own SN does the same); one power-iteration step
    (``n_power_iterations``, 1 in SN-GAN) per training step, on the first training-mode forward
    after :meth:`after_step` (or after an in-place weight update by the optimizer); eval mode uses
    u and v unchanged. Works under ``torch.no_grad()`` (sampling) and on generators (SAGAN uses
    SN in G and D): give the generator its own instance; calling its ``after_step`` after the
    generator's step is optional with non-fused optimizers, whose steps are detected.

    ``last_layer=False`` leaves the module's last weight layer (in ``modules()`` order: a
    generator's output layer) unnormalized. On MNIST a generator whose one-channel output layer
    is normalized collapses to one image (measured, docs/wgan.md): with the layer's gain fixed
    at 1 it can reach the saturated black/white pixels only by aligning every sample with one
    weight vector.
    """

    name = "spectral-norm"

    def __init__(
        self,
        n_power_iterations: int = 1,
        mode: str = "reshaped",
        init_iterations: int = 15,
        eps: float = 1e-12,
        last_layer: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("reshaped", "operator"):
            raise LipganError(f"spectral-norm mode must be 'reshaped' or 'operator', not {mode!r}")
        if n_power_iterations < 1:
            raise LipganError("n_power_iterations must be at least 1")
        if not isinstance(last_layer, bool):
            raise LipganError(f"spectral-norm last_layer must be true or false, not {last_layer!r}")
        self.n_power_iterations = int(n_power_iterations)
        self.mode = mode
        self.init_iterations = int(init_iterations)
        self.eps = eps
        self.last_layer = last_layer

    def attach(self, module: nn.Module) -> nn.Module:
        found = _layers.weight_layers(module)
        if not self.last_layer:
            found = found[:-1]
        if not found:
            raise LipganError("spectral-norm found no Linear/Conv layer in the module to normalize")
        for layer in found:
            _layers.spectral_norm(
                layer, self.mode, self.n_power_iterations, self.init_iterations, self.eps
            )
        return module

    def converge(
        self, module: nn.Module, max_iterations: int = 500, tol: float = 1e-6, certify: bool = True
    ) -> None:
        """Converge every layer's power iteration, then (``certify``) divide each layer by a
        certified upper bound of its norm: operator mode is then at most 1-Lipschitz per layer
        (reshaped mode: ``sigma(W_mat) <= 1``) until the next training step."""
        _layers.converge_spectral_norms(module, max_iterations, tol, certify)


@register("bjorck")
class Bjorck(_Normalized):
    """Exactly-1-Lipschitz critics after Anil, Lucas & Grosse 2019 ("Sorting out Lipschitz
    function approximation"): Björck-orthonormalized Linear weights and GroupSort activations.

    ``attach``: every Linear weight gets :class:`lipgan.layers.BjorckOrthonormal` (beta 0.5, 20
    iterations, order 1: the LNets defaults); the paper covers dense layers only, so
    convolutions get operator-norm spectral normalization (at most 1-Lipschitz, not gradient
    norm preserving); ReLU-like activation modules become ``GroupSort(group_size)`` (MaxMin for
    2). Activations called functionally in ``forward`` cannot be replaced (a warning says so).
    """

    name = "bjorck"

    def __init__(
        self, iters: int = 20, beta: float = 0.5, groupsort: bool = True, group_size: int = 2
    ) -> None:
        super().__init__()
        self.iters = int(iters)
        self.beta = float(beta)
        self.groupsort = bool(groupsort)
        self.group_size = int(group_size)
        _layers.BjorckOrthonormal(self.iters, self.beta)  # validates the options

    def attach(self, module: nn.Module) -> nn.Module:
        from torch.nn.utils import parametrize

        found = _layers.weight_layers(module)
        if not found:
            raise LipganError("bjorck found no Linear/Conv layer in the module")
        for layer in found:
            if parametrize.is_parametrized(layer, "weight"):
                continue
            if isinstance(layer, nn.Linear):
                parametrize.register_parametrization(
                    layer, "weight", _layers.BjorckOrthonormal(self.iters, self.beta)
                )
            else:
                _layers.spectral_norm(layer, mode="operator")
        if self.groupsort and _layers.groupsort_activations(module, self.group_size) == 0:
            warnings.warn(
                "bjorck: no activation module to replace by GroupSort; ReLU-like activations "
                "lose expressiveness under norm-constrained weights (Anil et al. 2019)",
                stacklevel=2,
            )
        return module

    def converge(self, module: nn.Module, max_iterations: int = 500, tol: float = 1e-6) -> None:
        """Converge the convolutions' operator-norm power iterations (see SpectralNorm)."""
        _layers.converge_spectral_norms(module, max_iterations, tol)
