"""Weight-space methods: clipping, weight decay and penalties on the layers' norms."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from lipgan import layers as _layers
from lipgan.constraints.base import Constraint, _check_positive, register
from lipgan.errors import LipganError


@register("weight-clip")
class WeightClip(Constraint):
    """WGAN's weight clipping: every parameter clamped to ``[-c, c]``.

    Arjovsky et al. 2017 (official ``main.py``) clamp before each critic step; clamping at
    ``attach`` and after every critic step is the same sequence of weights. ``c = 0.01`` there.
    """

    name = "weight-clip"

    def __init__(self, c: float = 0.01) -> None:
        super().__init__()
        _check_positive("c", c)
        self.c = float(c)

    @torch.no_grad()
    def _clamp(self, module: nn.Module) -> None:
        for p in module.parameters():
            p.clamp_(-self.c, self.c)

    def attach(self, module: nn.Module) -> nn.Module:
        self._clamp(module)
        return module

    def after_step(self, module: nn.Module) -> None:
        self._clamp(module)


class _KeptPowerIteration:
    """Power-iteration vectors kept per layer for the regularizers (not in the module)."""

    def __init__(self) -> None:
        self._state: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @torch.no_grad()
    def step(self, layer: nn.Module, iterations: int, init_iterations: int = 15) -> tuple:
        """Advance ``iterations`` steps (``init_iterations`` the first time); return (u, v)."""
        m = _layers.reshaped_weight(layer.weight.detach(), layer).float()
        state = self._state.get(layer)
        if state is None or state[0].shape[0] != m.shape[0] or state[0].device != m.device:
            u = torch.nn.functional.normalize(torch.randn(m.shape[0], device=m.device), dim=0)
            v = torch.nn.functional.normalize(m.t() @ u, dim=0)
            iterations = max(iterations, init_iterations)
        else:
            u, v = state
        for _ in range(iterations):
            v = torch.nn.functional.normalize(m.t() @ u, dim=0)
            u = torch.nn.functional.normalize(m @ v, dim=0)
        self._state[layer] = (u, v)
        return u, v


_FORMS = ("sum", "bound", "unit")


def _check_form(form: str) -> str:
    if form not in _FORMS:
        raise LipganError(f"unknown regularizer form {form!r}; use sum, bound or unit")
    return form


def _bound_penalty(lam: float, norms: list[torch.Tensor], form: str = "bound") -> torch.Tensor:
    """``form="bound"``: ``lam * max(0, prod_l n_l - 1)^2``, the squared excess over 1 of the
    network's product bound. Unlike ``sum_l n_l^2`` it grows faster (degree 2L) than a
    Wasserstein critic's gain (degree L for L homogeneous layers), so the critic's loss stays
    bounded below. ``form="unit"``: ``lam * (prod_l n_l - 1)^2``, two-sided, as WGAN-GP's
    penalty is on the gradient norm: it also pulls a product below 1 back up to 1."""
    bound = torch.stack(norms).prod()
    excess = bound - 1.0 if form == "unit" else torch.relu(bound - 1.0)
    return lam * excess.square()


@register("spectral-norm-reg")
class SpectralNormRegularizer(Constraint):
    """Spectral norm regularization (Yoshida & Miyato 2017): ``lam/2 * sum_l sigma_l^2``.

    ``sigma_l = u^T W_mat v`` of each Linear/Conv layer's reshaped kernel (the paper reshapes a
    conv kernel to ``b x a w h``), u and v from a power iteration kept between calls (one step
    per penalty call, 15 at the first); the gradient flows through ``sigma_l`` with u, v fixed,
    i.e. ``lam * sigma_l u v^T``. ``lam = 0.01``: the value of Yoshida & Miyato's spectral-norm
    experiments (recalled, not re-checked against the paper's text here). The vectors live in
    this object, not in the module's state_dict.
    """

    name = "spectral-norm-reg"

    def __init__(self, lam: float = 0.01, n_power_iterations: int = 1, form: str = "sum") -> None:
        super().__init__()
        _check_positive("lam", lam)
        self.lam = float(lam)
        self.form = _check_form(form)
        self.n_power_iterations = int(n_power_iterations)
        self._power = _KeptPowerIteration()

    def attach(self, module: nn.Module) -> nn.Module:
        for layer in _layers.weight_layers(module):
            self._power.step(layer, 0)
        return module

    def state_dict(self, module: nn.Module) -> dict:
        """The kept (u, v) of each weight layer, by position in ``weight_layers(module)``."""
        kept = self._power._state
        power = [list(kept[m]) if m in kept else [] for m in _layers.weight_layers(module)]
        return {**super().state_dict(module), "power": power}

    def load_state_dict(self, module: nn.Module, state: dict) -> None:
        super().load_state_dict(module, state)
        for layer, uv in zip(_layers.weight_layers(module), (state or {}).get("power", [])):
            if uv:
                self._power._state[layer] = tuple(t.to(layer.weight.device) for t in uv)

    def sigmas(self, module: nn.Module) -> list[torch.Tensor]:
        """Differentiable ``sigma_l = u^T W_mat v`` of every layer, after one power step."""
        out = []
        for layer in _layers.weight_layers(module):
            u, v = self._power.step(layer, self.n_power_iterations)
            m = _layers.reshaped_weight(layer.weight, layer).float()
            out.append(torch.dot(u, m @ v))
        return out

    def penalty(self, critic, real=None, fake=None, *, generator=None, shard=None):
        sig = self.sigmas(critic)
        if not sig:
            return None
        if self.form != "sum":
            return _bound_penalty(self.lam, sig, self.form)
        return 0.5 * self.lam * torch.stack(sig).square().sum()


@register("frobenius-reg")
class FrobeniusRegularizer(Constraint):
    """``lam * sum_l ||W_l||_F^2`` over Linear/Conv weights (biases excluded).

    ``||W||_F`` bounds the spectral norm, so this is the cheap Lipschitz bound; its gradient
    ``2 lam W`` equals SGD weight decay ``2 lam`` (the ``l2`` method), which is the seed note's
    "L2 regularization is the Frobenius bound". ``lam = 5e-5`` matches ``l2``'s 1e-4.

    ``form``: ``"sum"`` (the above), ``"bound"`` (the squared excess over 1 of the product of
    the norms) or ``"unit"`` (the product's squared distance to 1, both sides), see
    :func:`_bound_penalty`. ``rescale=True`` scales every weight by the same factor at
    ``attach`` so that the product starts at 1: from torch's init (a product near 12 for
    dcgan28) the bound forms' first steps crush the weights instead (docs/recipes.md, U1-U3).
    A resumed run loads its weights after ``attach``, so the rescale acts once, at the start.
    """

    name = "frobenius-reg"

    def __init__(self, lam: float = 5e-5, form: str = "sum", rescale: bool = False) -> None:
        super().__init__()
        _check_positive("lam", lam)
        self.lam = float(lam)
        self.form = _check_form(form)
        self.rescale = bool(rescale)

    def spec(self) -> dict:
        """As every constraint's, without ``rescale`` when it is off: the spec of a run made
        before the option existed, so its checkpoints still resume as the same method."""
        spec = super().spec()
        if not self.rescale:
            spec["options"].pop("rescale", None)
        return spec

    @torch.no_grad()
    def attach(self, module: nn.Module) -> nn.Module:
        ws = [layer.weight for layer in _layers.weight_layers(module)]
        if self.rescale and ws:
            bound = torch.stack([w.float().norm() for w in ws]).prod()
            for w in ws:
                w.mul_(bound.pow(-1.0 / len(ws)).to(w.dtype))
        return module

    def penalty(self, critic, real=None, fake=None, *, generator=None, shard=None):
        ws = [layer.weight for layer in _layers.weight_layers(critic)]
        if not ws:
            return None
        if self.form != "sum":
            return _bound_penalty(self.lam, [w.float().norm() for w in ws], self.form)
        return self.lam * sum(w.float().square().sum() for w in ws)


@register("l2")
class L2(Constraint):
    """L2 regularization as the optimizer's weight decay: trainers add ``weight_decay`` to it.

    For plain SGD (and torch's Adam, whose weight decay is added to the gradient) this equals
    :class:`FrobeniusRegularizer` with ``lam = weight_decay / 2``, except that the optimizer
    also decays biases. Default 1e-4 (He et al. 2016); no WGAN paper prescribes one.
    """

    name = "l2"

    def __init__(self, weight_decay: float = 1e-4) -> None:
        super().__init__()
        _check_positive("weight_decay", weight_decay)
        self.weight_decay = float(weight_decay)
