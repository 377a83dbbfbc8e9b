"""Every way of making a network Lipschitz, behind one small interface.

A method is an object the trainers call at three points, each doing nothing where the method has
nothing to do there:

- ``attach(module)``: change the module once (spectral normalization registers a
  parametrization) and return it;
- ``penalty(critic, real, fake)``: a scalar added to the critic's (or classifier's) loss, or
  ``None``; classifier trainers pass ``fake=None``;
- ``after_step(module)``: act after each optimizer step (weight clipping, projections).

Methods are made by name with their papers' defaults through :func:`get`; users add their own with
:func:`register`. A list of methods acts as one (:class:`Compose`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lipgan.errors import LipganError


class Constraint:
    """Base class: a method that does nothing at every point.

    ``last_grad_norm`` holds the per-sample gradient norms (shape ``(B,)``, detached) of the last
    penalty evaluation for methods that compute them, so the trainer can log the critic's
    measured Lipschitz constant without a second backward; ``None`` otherwise.
    """

    name: str = "none"
    #: added to the optimizer's ``weight_decay`` by the trainers (the ``l2`` method uses it)
    weight_decay: float = 0.0

    def __init__(self) -> None:
        self.last_grad_norm: torch.Tensor | None = None

    def attach(self, module: nn.Module) -> nn.Module:
        return module

    def penalty(
        self, critic: nn.Module, real: torch.Tensor, fake: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        return None

    def after_step(self, module: nn.Module) -> None:
        return None

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

    def __init__(self, methods: Iterable[Constraint]) -> None:
        super().__init__()
        self.methods = list(methods)

    def attach(self, module: nn.Module) -> nn.Module:
        for m in self.methods:
            module = m.attach(module)
        return module

    def penalty(self, critic, real, fake=None):
        total = None
        for m in self.methods:
            p = m.penalty(critic, real, fake)
            if p is not None:
                total = p if total is None else total + p
            if m.last_grad_norm is not None:
                self.last_grad_norm = m.last_grad_norm
        return total

    @property
    def weight_decay(self) -> float:  # type: ignore[override]
        return sum(m.weight_decay for m in self.methods)

    def after_step(self, module: nn.Module) -> None:
        for m in self.methods:
            m.after_step(module)


_REGISTRY: dict[str, Callable[..., Constraint]] = {"none": Constraint}


def register(name: str) -> Callable:
    """Decorator adding a constraint factory to the registry under ``name``."""

    def deco(factory: Callable[..., Constraint]) -> Callable[..., Constraint]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    """Names :func:`get` accepts."""
    return sorted(_REGISTRY)


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
        return Compose(get(n) for n in name)
    if name not in _REGISTRY:
        raise LipganError(
            f"unknown Lipschitz method {name!r}; choose one of: {', '.join(available())}"
        )
    try:
        return _REGISTRY[name](**overrides)
    except TypeError as exc:
        raise LipganError(f"bad option for method {name!r}: {exc}") from None
