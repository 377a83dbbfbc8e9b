"""Every way of making a network Lipschitz, behind one small, public protocol.

A method is a :class:`Constraint`; trainers call it at these points, each doing nothing where the
method has nothing to do there:

- ``attach(module)``: change the module once (spectral normalization registers a
  parametrization) and return it;
- ``penalty(critic, real, fake, *, generator, shard)``: a scalar added to the critic's (or
  classifier's) loss, or ``None``; classifier trainers pass ``fake=None``. Every random number it
  draws comes from ``generator`` (a ``torch.Generator`` on the batch's device; ``None``: torch's
  global RNG), per sample through :func:`per_sample_rand` so that data-parallel ranks draw the
  one-process values of their rows (``shard``);
- ``after_step(module)``: act after each optimizer step (weight clipping, projections);
- ``finalize(module)``: make the constraint hold exactly before the module is bounded or
  exported (converge spectral normalization's power iterations);
- ``state_dict(module)`` / ``load_state_dict(module, state)``: what the method keeps about the
  module outside ``module.state_dict()`` (kept power-iteration vectors, whether a
  parametrization must iterate at its next forward), so a resume continues bit for bit;
- ``needs_input_grad``: whether ``penalty`` differentiates through gradients with respect to the
  input (a double backward): such a critic is never ``torch.compile``-d;
- ``spec()``: ``{"name": registry name, "options": {...}}``, recorded in a run's config and
  checkpoint; :func:`from_spec` (``get(name, **options)``) rebuilds the method on resume.

Methods are made by name with their papers' defaults through :func:`get`; users add their own with
:func:`register` (the name is then what ``spec()`` records). A list of methods acts as one
(:class:`Compose`).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lipgan import layers as _layers
from lipgan.errors import LipganError


@dataclass(frozen=True)
class Shard:
    """Where a batch sits in a larger one: rows ``index`` of a global batch of ``total`` rows
    (data parallelism: each rank holds a slice of the global batch)."""

    index: slice
    total: int


def per_sample_rand(
    n: int,
    *,
    generator: torch.Generator | None = None,
    shard: Shard | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``n`` draws of ``U[0, 1)``, one per sample, shape ``(n,)``.

    With a ``shard``, the draw is made for the whole global batch (``shard.total`` values, the
    ones a single process draws) and the shard's rows are returned: every rank then uses the
    one-process numbers of its rows, and every rank's generator advances alike.
    """
    total = n if shard is None else shard.total
    u = torch.rand(total, device=device, dtype=dtype, generator=generator)
    return u if shard is None else u[shard.index]


def _spec_options(obj: Any) -> dict:
    """The ``__init__`` keyword arguments of ``obj`` read back from its attributes of the same
    names (how lipgan's methods keep them); a missing one is a LipganError."""
    out = {}
    for p in inspect.signature(type(obj).__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if not hasattr(obj, p.name):
            raise LipganError(
                f"{type(obj).__name__}.spec(): no attribute {p.name!r} to record its option; "
                "keep each __init__ argument as an attribute of that name, or override spec()"
            )
        out[p.name] = getattr(obj, p.name)
    return out


def _parametrization_state(module: nn.Module) -> dict:
    """Whether each spectral-norm parametrization of ``module`` must iterate at its next training
    forward (not in ``module.state_dict()``; a fresh one always iterates, so without it a
    resume would add one power-iteration step)."""
    flags = [bool(p._stale) for p in _layers.spectral_norm_parametrizations(module)]
    return {"stale": flags} if flags else {}


def _load_parametrization_state(module: nn.Module, state: dict) -> None:
    flags = iter(state.get("stale", []))
    for layer in _layers.weight_layers(module):
        plist = getattr(getattr(layer, "parametrizations", None), "weight", None)
        for p in plist or []:
            if isinstance(p, _layers.SpectralNormParametrization):
                p._stale = next(flags, True)
                # the weights were just loaded: their current version counts as seen
                p._seen_version = plist.original._version


class Constraint:
    """Base class: a method that does nothing at every point (the ``none`` method).

    ``last_grad_norm`` holds the per-sample gradient norms (shape ``(B,)``, detached) of the last
    penalty evaluation for methods that compute them, so the trainer can log the critic's
    measured Lipschitz constant without a second backward; ``None`` otherwise.
    """

    name: str = "none"
    #: added to the optimizer's ``weight_decay`` by the trainers (the ``l2`` method uses it)
    weight_decay: float = 0.0
    #: ``penalty`` differentiates through input gradients (double backward): no torch.compile
    needs_input_grad: bool = False

    def __init__(self) -> None:
        self.last_grad_norm: torch.Tensor | None = None

    def attach(self, module: nn.Module) -> nn.Module:
        return module

    def penalty(
        self,
        critic: nn.Module,
        real: torch.Tensor,
        fake: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        shard: Shard | None = None,
    ) -> torch.Tensor | None:
        return None

    def after_step(self, module: nn.Module) -> None:
        return None

    def finalize(self, module: nn.Module) -> None:
        """Converge the module's spectral-norm power iterations (a no-op without them)."""
        if _layers.spectral_norm_parametrizations(module):
            _layers.converge_spectral_norms(module)

    def state_dict(self, module: nn.Module) -> dict:
        """Tensors, numbers and lists only (a ``weights_only`` checkpoint loads them)."""
        return _parametrization_state(module)

    def load_state_dict(self, module: nn.Module, state: dict) -> None:
        _load_parametrization_state(module, state or {})

    def spec(self) -> dict:
        """``{"name": ..., "options": {...}}``: ``get(name, **options)`` rebuilds this method."""
        return {"name": self.name, "options": _spec_options(self)}

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}"
            for k, v in vars(self).items()
            if not k.startswith("_") and k != "last_grad_norm"
        )
        return f"{type(self).__name__}({fields})"


class Compose(Constraint):
    """Several methods acting as one: attach in order, penalties summed, after_step in order."""

    name = "compose"

    def __init__(self, methods: Iterable[Constraint | dict | str]) -> None:
        super().__init__()
        self.methods = [m if isinstance(m, Constraint) else from_spec(m) for m in methods]

    def attach(self, module: nn.Module) -> nn.Module:
        for m in self.methods:
            module = m.attach(module)
        return module

    def penalty(self, critic, real, fake=None, *, generator=None, shard=None):
        total = None
        for m in self.methods:
            p = m.penalty(critic, real, fake, generator=generator, shard=shard)
            if p is not None:
                total = p if total is None else total + p
            if m.last_grad_norm is not None:
                self.last_grad_norm = m.last_grad_norm
        return total

    @property
    def weight_decay(self) -> float:  # type: ignore[override]
        return sum(m.weight_decay for m in self.methods)

    @property
    def needs_input_grad(self) -> bool:  # type: ignore[override]
        return any(m.needs_input_grad for m in self.methods)

    def after_step(self, module: nn.Module) -> None:
        for m in self.methods:
            m.after_step(module)

    def finalize(self, module: nn.Module) -> None:
        for m in self.methods:
            m.finalize(module)

    def state_dict(self, module: nn.Module) -> dict:
        return {"methods": [m.state_dict(module) for m in self.methods]}

    def load_state_dict(self, module: nn.Module, state: dict) -> None:
        for m, s in zip(self.methods, (state or {}).get("methods", [])):
            m.load_state_dict(module, s)

    def spec(self) -> dict:
        return {"name": "compose", "options": {"methods": [m.spec() for m in self.methods]}}


_REGISTRY: dict[str, Callable[..., Constraint]] = {"none": Constraint, "compose": Compose}


def register(name: str) -> Callable:
    """Decorator adding a constraint factory (usually a :class:`Constraint` subclass) to the
    registry under ``name``; a subclass without its own ``name`` gets this one, so its
    ``spec()`` records it and a resumed run rebuilds it."""

    def deco(factory: Callable[..., Constraint]) -> Callable[..., Constraint]:
        if name in _REGISTRY and _REGISTRY[name] is not factory and name in ("none", "compose"):
            raise LipganError(f"{name!r} is a built-in constraint name; choose another")
        if isinstance(factory, type) and "name" not in vars(factory):
            factory.name = name
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    """Names :func:`get` accepts (``compose`` aside: a list or comma-separated names)."""
    return sorted(n for n in _REGISTRY if n != "compose")


def get(name: str | Constraint | Iterable, **overrides) -> Constraint:
    """Make a method by name with its paper's defaults, ``overrides`` replacing some of them.

    A :class:`Constraint` is returned as is; a list (or a comma-separated string) becomes a
    :class:`Compose`.
    """
    if isinstance(name, Constraint):
        return name
    if isinstance(name, str) and "," in name:
        name = [n.strip() for n in name.split(",") if n.strip()]
    if not isinstance(name, str):
        if overrides:
            raise LipganError(
                "options apply to one method; build each with get(name, **options) and pass a list"
            )
        return Compose(get(n) for n in name)
    if name not in _REGISTRY:
        raise LipganError(
            f"unknown Lipschitz method {name!r}; choose one of: {', '.join(available())}"
        )
    try:
        return _REGISTRY[name](**overrides)
    except (TypeError, ValueError) as exc:
        raise LipganError(f"bad option for method {name!r}: {exc}") from None


def from_spec(spec: dict | str) -> Constraint:
    """The method a :meth:`Constraint.spec` describes (a bare name: its defaults)."""
    if isinstance(spec, str):
        return get(spec)
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise LipganError(f"not a constraint spec (a mapping with name and options): {spec!r}")
    options = spec.get("options") or {}
    if not isinstance(options, dict):
        raise LipganError(f"constraint {spec['name']!r}: options must be a mapping: {options!r}")
    return get(spec["name"], **options)


def checked_spec(constraint: Constraint) -> dict:
    """``constraint.spec()``, checked to rebuild an object of the same class through the
    registry (else a run could not be resumed as itself): a LipganError says to register it."""
    try:
        spec = constraint.spec()
        rebuilt = from_spec(spec)
    except LipganError as exc:
        raise LipganError(
            f"constraint {constraint!r} cannot be recorded: {exc}; register its class with "
            "lipgan.constraints.register(NAME)"
        ) from None
    if type(rebuilt) is not type(constraint):
        raise LipganError(
            f"constraint {type(constraint).__name__} records itself as {spec['name']!r}, which "
            f"builds a {type(rebuilt).__name__}; register its class under its own name with "
            "lipgan.constraints.register(NAME)"
        )
    return spec


# --------------------------------------------------------------------------------------------
# The methods


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise LipganError(f"{name} must be positive, got {value!r}")


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


@register("gradient-penalty")
class GradientPenalty(Constraint):
    """WGAN-GP (Gulrajani et al. 2017): ``lam * mean_i (||grad_x D(x_i)||_2 - 1)^2``.

    ``x_i = a_i real_i + (1 - a_i) fake_i`` with one ``a_i ~ U[0, 1]`` per sample (not per
    pixel), the norm over all non-batch dimensions of sample ``i`` (not element-wise). ``real``
    and ``fake``: ``(B, ...)`` of one shape (images or flat vectors). ``lam = 10`` as in the
    paper and the official ``gan_mnist.py``.

    Both inputs are detached before interpolating, so the generator's graph is never part of
    the critic's step even when ``fake`` still carries it. The gradient is taken with
    ``torch.autograd.grad`` with respect to the interpolates only, with ``create_graph=True``
    for the double backward (one backward of the whole loss afterwards: DDP-safe). The norm is
    computed in float32 (also under bf16 autocast). ``fake=None`` (classifier trainers)
    penalizes at the real points. A critic with several outputs per sample is probed along one
    random unit direction ``r_i`` per sample: the norm of ``J_i^T r_i``, a lower estimate of the
    local Lipschitz constant. Sets ``last_grad_norm`` to the per-sample norms, shape ``(B,)``.
    """

    name = "gradient-penalty"
    needs_input_grad = True

    def __init__(self, lam: float = 10.0) -> None:
        super().__init__()
        _check_positive("lam", lam)
        self.lam = float(lam)

    def _shape_penalty(self, norm: torch.Tensor) -> torch.Tensor:
        return (norm - 1.0).square()

    def interpolate(
        self,
        real: torch.Tensor,
        fake: torch.Tensor | None,
        *,
        generator: torch.Generator | None = None,
        shard: Shard | None = None,
    ) -> torch.Tensor:
        """``a_i real_i + (1 - a_i) fake_i``, one ``a_i`` per sample; detached inputs."""
        real = real.detach()
        if fake is None:
            return real.clone()
        fake = fake.detach()
        if fake.shape != real.shape:
            raise LipganError(
                f"real and fake batches must have one shape for the penalty; got "
                f"{tuple(real.shape)} and {tuple(fake.shape)}"
            )
        alpha = per_sample_rand(
            real.shape[0], generator=generator, shard=shard, device=real.device, dtype=real.dtype
        )
        return torch.lerp(fake, real, alpha.view((-1,) + (1,) * (real.dim() - 1)))

    def penalty(self, critic, real, fake=None, *, generator=None, shard=None):
        x = self.interpolate(real, fake, generator=generator, shard=shard).requires_grad_(True)
        batch = x.shape[0]
        with torch.enable_grad():
            out = critic(x)
            if out.dim() == 0 or out.shape[0] != batch:
                raise LipganError(
                    "the critic must return one score per sample, shape (B,) or (B, 1); got "
                    f"{tuple(out.shape)} for a batch of {batch} (do not average inside the model)"
                )
            out = out.reshape(batch, -1)
            if out.shape[1] == 1:
                probe = torch.ones_like(out)
            else:
                noise = torch.randn(
                    out.shape, device=out.device, dtype=torch.float32, generator=generator
                )
                probe = torch.nn.functional.normalize(noise)
                probe = probe.to(out.dtype)
            (grad,) = torch.autograd.grad(out, x, grad_outputs=probe, create_graph=True)
        with torch.autocast(device_type=grad.device.type, enabled=False):
            # at least float32 (bf16 gradients lose the norm's precision); float64 stays
            wide = torch.promote_types(grad.dtype, torch.float32)
            norm = torch.linalg.vector_norm(grad.reshape(batch, -1).to(wide), dim=1)
            result = self.lam * self._shape_penalty(norm).mean()
        self.last_grad_norm = norm.detach()
        return result


@register("lipschitz-penalty")
class LipschitzPenalty(GradientPenalty):
    """WGAN-LP (Petzka et al. 2018): the one-sided ``lam * mean_i max(0, ||grad||_2 - 1)^2``.

    Same sampling and norm as :class:`GradientPenalty`; only gradients above 1 are penalized.
    ``lam = 10`` (the paper keeps WGAN-GP's value).
    """

    name = "lipschitz-penalty"

    def _shape_penalty(self, norm: torch.Tensor) -> torch.Tensor:
        return torch.relu(norm - 1.0).square()


@register("spectral-norm")
class SpectralNorm(Constraint):
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

    def after_step(self, module: nn.Module) -> None:
        for p in _layers.spectral_norm_parametrizations(module):
            p.mark_stale()

    def converge(
        self, module: nn.Module, max_iterations: int = 500, tol: float = 1e-6, certify: bool = True
    ) -> None:
        """Converge every layer's power iteration, then (``certify``) divide each layer by a
        certified upper bound of its norm: operator mode is then at most 1-Lipschitz per layer
        (reshaped mode: ``sigma(W_mat) <= 1``) until the next training step."""
        _layers.converge_spectral_norms(module, max_iterations, tol, certify)


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


_FORMS = ("sum", "bound")


def _check_form(form: str) -> str:
    if form not in _FORMS:
        raise LipganError(f"unknown regularizer form {form!r}; use sum or bound")
    return form


def _bound_penalty(lam: float, norms: list[torch.Tensor]) -> torch.Tensor:
    """``lam * max(0, prod_l n_l - 1)^2``: the squared excess over 1 of the network's product
    bound. Unlike ``sum_l n_l^2`` it grows faster (degree 2L) than a Wasserstein critic's gain
    (degree L for L homogeneous layers), so the critic's loss stays bounded below."""
    bound = torch.stack(norms).prod()
    return lam * torch.relu(bound - 1.0).square()


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
        if self.form == "bound":
            return _bound_penalty(self.lam, sig)
        return 0.5 * self.lam * torch.stack(sig).square().sum()


@register("frobenius-reg")
class FrobeniusRegularizer(Constraint):
    """``lam * sum_l ||W_l||_F^2`` over Linear/Conv weights (biases excluded).

    ``||W||_F`` bounds the spectral norm, so this is the cheap Lipschitz bound; its gradient
    ``2 lam W`` equals SGD weight decay ``2 lam`` (the ``l2`` method), which is the seed note's
    "L2 regularization is the Frobenius bound". ``lam = 5e-5`` matches ``l2``'s 1e-4.
    """

    name = "frobenius-reg"

    def __init__(self, lam: float = 5e-5, form: str = "sum") -> None:
        super().__init__()
        _check_positive("lam", lam)
        self.lam = float(lam)
        self.form = _check_form(form)

    def penalty(self, critic, real=None, fake=None, *, generator=None, shard=None):
        ws = [layer.weight for layer in _layers.weight_layers(critic)]
        if not ws:
            return None
        if self.form == "bound":
            return _bound_penalty(self.lam, [w.float().norm() for w in ws])
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


@register("bjorck")
class Bjorck(Constraint):
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

    def after_step(self, module: nn.Module) -> None:
        for p in _layers.spectral_norm_parametrizations(module):
            p.mark_stale()

    def converge(self, module: nn.Module, max_iterations: int = 500, tol: float = 1e-6) -> None:
        """Converge the convolutions' operator-norm power iterations (see SpectralNorm)."""
        _layers.converge_spectral_norms(module, max_iterations, tol)
