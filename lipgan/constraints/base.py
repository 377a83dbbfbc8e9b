"""The constraint protocol (:class:`Constraint`), :class:`Compose` and the registry."""

from __future__ import annotations

import inspect
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
    flags = [p.resume_state()["stale"] for p in _layers.spectral_norm_parametrizations(module)]
    return {"stale": flags} if flags else {}


def _load_parametrization_state(module: nn.Module, state: dict) -> None:
    flags = iter(state.get("stale", []))
    for layer in _layers.weight_layers(module):
        plist = getattr(getattr(layer, "parametrizations", None), "weight", None)
        for p in plist or []:
            if isinstance(p, _layers.SpectralNormParametrization):
                # the weights were just loaded: their current version counts as seen
                p.load_resume_state({"stale": next(flags, True)}, plist.original)


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
        """Make the constraint hold exactly before ``module`` is bounded or exported (spectral
        normalization converges its power iterations); trainers call it once, at the end."""
        return None

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


# --------------------------------------------------------------------------- worker processes
# A "spawn" worker process (compare/study --jobs N) starts from a fresh interpreter: it imports
# lipgan, whose methods register themselves, but not the module where a user registered their
# own. So the parent hands each user entry to its workers by reference (module and qualified
# name, what pickle records for a class or a function): the worker imports that module and
# registers the entry under the parent's name.


def _is_lipgans(factory: Callable) -> bool:
    module = getattr(factory, "__module__", None) or ""
    return module == "lipgan" or module.startswith("lipgan.")


def _by_reference(name: str, factory: Callable) -> bytes:
    """``factory`` pickled by reference, or a LipganError saying why a worker cannot import it
    (a class defined inside a function, a lambda, an instance...)."""
    import pickle

    qualname = getattr(factory, "__qualname__", "")
    if not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        reason = f"{getattr(factory, '__module__', '?')}.{qualname or factory!r} is not defined at "
        reason += "the top level of a module"
    else:
        try:
            return pickle.dumps(factory)
        except Exception as exc:  # pickle raises PicklingError, AttributeError, TypeError...
            reason = f"{type(exc).__name__}: {exc}"
    raise LipganError(
        f"constraint {name!r} cannot reach the worker processes of --jobs ({reason}); define "
        "its class at the top level of an importable module, or run with --jobs 1"
    )


def worker_registry() -> dict[str, bytes | str]:
    """The user's registry entries for worker processes: name -> the factory pickled by
    reference, or the one-line reason it cannot be (an error only if a worker builds it)."""
    out: dict[str, bytes | str] = {}
    for name, factory in _REGISTRY.items():
        if _is_lipgans(factory):
            continue
        try:
            out[name] = _by_reference(name, factory)
        except LipganError as exc:
            out[name] = str(exc)
    return out


def load_worker_registry(entries: dict[str, bytes | str]) -> None:
    """In a worker: register each entry of :func:`worker_registry`. Its module is imported when
    a cell first builds it (a worker imports only what it trains); one that cannot be imported
    here, or that the parent could not hand over, raises its one-line reason then."""
    for name, blob in entries.items():
        _REGISTRY[name] = _FromParent(name, blob)


class _FromParent:
    """A registry entry handed over by the parent process: unpickled (its module imported) and
    registered under its name at the first call, then built like any entry."""

    def __init__(self, name: str, blob: bytes | str) -> None:
        self.name, self.blob = name, blob

    def __call__(self, **options: Any) -> Constraint:
        import pickle

        if isinstance(self.blob, str):
            raise LipganError(self.blob)
        try:
            factory = pickle.loads(self.blob)
        except Exception as exc:  # the module or name is not importable in this process
            raise LipganError(
                f"constraint {self.name!r} cannot be imported in a worker process of --jobs "
                f"({type(exc).__name__}: {exc}); define it in an importable module (not an "
                "interactive session), or run with --jobs 1"
            ) from None
        register(self.name)(factory)
        return factory(**options)


def check_for_workers(names: str | Iterable[str | None] | None) -> None:
    """Refuse (a one-line LipganError) a constraint name among ``names`` (comma-separated
    strings, None skipped) that is registered here but cannot be handed to a worker process;
    callers check before they write anything."""
    if names is None:
        return
    for item in [names] if isinstance(names, str) else names:
        for name in (item or "").split(","):
            factory = _REGISTRY.get(name.strip())
            if factory is not None and not _is_lipgans(factory):
                _by_reference(name.strip(), factory)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise LipganError(f"{name} must be positive, got {value!r}")
