"""Network architectures looked up by name.

Every module of this package registers its builders with :func:`register`; :func:`build` makes a
network by kind (``"generator"``, ``"critic"``, ``"classifier"``) and name. Modules are imported by
name on first use, so adding an architecture needs no edit here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable

from torch import nn

from lipgan.errors import LipganError

_REGISTRY: dict[tuple[str, str], Callable[..., nn.Module]] = {}
_loaded = False


def register(kind: str, name: str) -> Callable:
    """Decorator: ``@register("critic", "dcgan28")`` on a function returning an ``nn.Module``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[(kind, name)] = fn
        return fn

    return deco


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def names(kind: str) -> list[str]:
    """The registered names of one kind."""
    _load_all()
    return sorted(n for k, n in _REGISTRY if k == kind)


def build(kind: str, name: str, **kwargs) -> nn.Module:
    """Build the ``kind`` network registered as ``name`` with keyword options ``kwargs``."""
    _load_all()
    if (kind, name) not in _REGISTRY:
        raise LipganError(f"unknown {kind} model {name!r}; choose one of: {', '.join(names(kind))}")
    try:
        return _REGISTRY[(kind, name)](**kwargs)
    except TypeError as exc:
        raise LipganError(f"bad option for {kind} model {name!r}: {exc}") from None


def default_option(kind: str, name: str, option: str) -> object:
    """The default of keyword ``option`` of the ``kind`` builder ``name`` (``None``: it has none,
    or does not take it); an unknown builder is a LipganError naming the registered ones."""
    _load_all()
    fn = _REGISTRY.get((kind, name))
    if fn is None:
        raise LipganError(f"unknown {kind} model {name!r}; choose one of: {', '.join(names(kind))}")
    p = inspect.signature(fn).parameters.get(option)
    return None if p is None or p.default is inspect.Parameter.empty else p.default
