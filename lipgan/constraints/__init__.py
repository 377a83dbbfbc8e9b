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

from lipgan.constraints.base import (
    Compose,
    Constraint,
    Shard,
    available,
    checked_spec,
    from_spec,
    get,
    per_sample_rand,
    register,
)
from lipgan.constraints.normalize import Bjorck, SpectralNorm
from lipgan.constraints.penalties import GradientPenalty, LipschitzPenalty
from lipgan.constraints.regularizers import (
    L2,
    FrobeniusRegularizer,
    SpectralNormRegularizer,
    WeightClip,
)

__all__ = [
    "L2", "Bjorck", "Compose", "Constraint", "FrobeniusRegularizer", "GradientPenalty",
    "LipschitzPenalty", "Shard", "SpectralNorm", "SpectralNormRegularizer", "WeightClip",
    "available", "checked_spec", "from_spec", "get", "per_sample_rand", "register",
]  # fmt: skip
