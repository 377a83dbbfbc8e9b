"""The everyday calls: ``layer_table``, ``upper_bounds``, ``estimate`` and the report they make.

Any ``nn.Module`` of one tensor input and one tensor output is accepted: its graph is traced
(:mod:`lipgan.analysis.graph`), every leaf bounded (:mod:`lipgan.analysis.leaves`) and the bounds
composed; a chain (``nn.Sequential`` or a forward that is one path) gets the chain bounds of
:mod:`lipgan.analysis.chain` whole. The model is analysed as a float64 CPU copy in eval mode; the
caller's model is untouched.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import nn

from lipgan.analysis.graph import graph_bounds, trace
from lipgan.analysis.leaves import Leaf
from lipgan.analysis.lower import lower_bounds
from lipgan.errors import LipganError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["LipschitzReport", "UnsoundBoundError", "layer_table", "upper_bounds", "estimate"]


class UnsoundBoundError(LipganError):
    """A certified upper bound below an attained lower bound: a bug (or a wrong declared
    ``lipschitz_constant``), never a result."""


def prepare(model: nn.Module) -> nn.Module:
    """A float64 CPU copy in eval mode: Dropout off, BatchNorm on running stats, no SN updates.

    On the CPU because the analysis is float64 and small-batch (and so that a model trained on a
    GPU is bounded the same way); the caller's model is left where it is.
    """
    m = copy.deepcopy(model).cpu()
    m.eval()
    return m.double()


def _probe(m64: nn.Module, original: nn.Module, shape: tuple[int, ...]) -> None:
    """Run the float64 copy once; a failure becomes a message that says what to change."""
    try:
        with torch.no_grad():
            m64(torch.zeros(2, *shape, dtype=torch.float64))
        return
    except Exception as exc:
        err = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        m32 = copy.deepcopy(original).cpu().eval().float()
        with torch.no_grad():
            m32(torch.zeros(2, *shape))
        ok32 = True
    except Exception:
        ok32 = False
    if ok32:
        raise LipganError(
            f"{type(original).__name__} runs in float32 but fails in float64 ({err}); lipgan "
            "analyses a float64 copy so that its bounds are not spoilt by rounding: make the "
            "forward dtype-agnostic (no hard-coded float32 tensors or dtype checks)"
        )
    raise LipganError(
        f"{type(original).__name__} fails on inputs of shape {shape} ({err}); give the model's "
        "input shape without the batch dimension, e.g. input_shape=(1, 28, 28)"
    )


def _infer_shape(model: nn.Module, input_shape) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    first = None
    if isinstance(model, nn.Sequential):
        first = next((m for m in model.modules() if not isinstance(m, nn.Sequential)), None)
    elif isinstance(model, nn.Linear):
        first = model
    else:
        try:
            gm = trace(model)
            ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
            for u in ph.users:
                if u.op == "call_module":
                    first = gm.get_submodule(u.target)
                    break
        except LipganError:
            first = None
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    raise LipganError(
        "give the input shape (C,H,W) of the model, e.g. --input-shape 1,28,28 or "
        "input_shape=(1, 28, 28)"
    )


def _stable_rank(leaf: Leaf) -> float | None:
    """``||W||_F^2 / sigma(W)^2`` of the weight matrix (a conv's reshaped kernel): between 1 and
    the rank. Close to 1 means the layer passes on essentially one feature direction."""
    if leaf.frobenius is None:
        return None
    sigma = leaf.reshaped
    if sigma is None and isinstance(leaf.module, nn.Linear):
        sigma = leaf.operator
    if not sigma:
        return None
    return (leaf.frobenius / sigma) ** 2


def _row(leaf: Leaf) -> dict:
    lin = leaf.kind == "linear"
    return {
        "name": leaf.name,
        "type": leaf.type_name or type(leaf.module).__name__,
        "kind": leaf.kind,
        "in_shape": list(leaf.in_shape),
        "out_shape": list(leaf.out_shape),
        "frobenius": leaf.frobenius,
        "frobenius_bound": leaf.frobenius_bound if lin else None,
        "operator": leaf.operator if lin else None,
        "operator_method": leaf.operator_method if lin else None,
        "reshaped": leaf.reshaped,
        "stable_rank": _stable_rank(leaf),
        "slope": list(leaf.slope) if leaf.slope else None,
        "constant": leaf.constant,
    }


def _bounds(m: nn.Module, original: nn.Module, shape, **opts):
    _probe(m, original, shape)
    return graph_bounds(m, shape, **opts)


def layer_table(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[dict]:
    """One row per leaf of the model's graph, named by its node (a module's qualified name,
    e.g. ``layer1.0.conv1``, or a function node's name, e.g. ``relu_1``): type, shapes,
    Frobenius norm, operator norm (exact or a certified upper bound), reshaped norm (convs),
    activation slopes, and ``constant``, the Lipschitz constant the products use."""
    m = prepare(model)
    shape = _infer_shape(m, input_shape)
    res = _bounds(m, model, shape, lipsdp=False, dense_limit=0)
    return [_row(leaf) for leaf in res.leaves]


def upper_bounds(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    dense_limit: int = 1024,
    lipsdp: bool = True,
    lipsdp_width: int = 512,
    lipsdp_iters: int = 300,
    dense_flops: float = 2e9,
    check: bool = True,
    lipsdp_time: float | None = None,
    _prepared: bool = False,
    _notes: list[str] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Named certified upper bounds of the L2 Lipschitz constant and the layer table.

    ``frobenius_product``, ``operator_product``, ``merged_segments`` and (where a hidden layer of
    width <= ``lipsdp_width`` sits between two linear blocks) ``lipsdp_partition``, each
    composed along the graph. Merged runs get their exact norm from a dense matrix when a side
    is at most ``dense_limit`` and building it costs at most ``dense_flops`` multiply-adds;
    LipSDP runs ``lipsdp_iters`` first-order steps. Every choice depends on the model and these
    options only, never on time (``lipsdp_time`` is accepted and ignored).
    """
    if lipsdp_time is not None:
        warnings.warn(
            "lipsdp_time is ignored: LipSDP stops on iteration counts (lipsdp_iters)",
            DeprecationWarning,
            stacklevel=2,
        )
    m = model if _prepared else prepare(model)
    shape = _infer_shape(m, input_shape)
    res = _bounds(
        m,
        model,
        shape,
        dense_limit=dense_limit,
        dense_flops=dense_flops,
        lipsdp=lipsdp,
        lipsdp_width=lipsdp_width,
        lipsdp_iters=lipsdp_iters,
        check=check,
        notes=_notes if _notes is not None else [],
    )
    return res.upper, [_row(leaf) for leaf in res.leaves]


@dataclass
class LipschitzReport:
    """Upper bounds (certified), lower bounds (attained), the layer table and timings.

    Constructing a report whose best certified upper bound is below its best attained lower
    bound raises :class:`UnsoundBoundError`: that is a bug, never a result to print."""

    upper: dict[str, float]
    lower: dict[str, float]
    layers: list[dict] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.upper and self.lower:
            up, lo = self.best_upper, self.best_lower
            if up < lo * (1 - 1e-6) - 1e-12:
                raise UnsoundBoundError(
                    f"internal check failed: the certified upper bound {up:.6g} is below the "
                    f"attained lower bound {lo:.6g}. This is a bug in lipgan (or a module's "
                    "declared lipschitz_constant is wrong); please report it with the model"
                )

    @property
    def best_upper(self) -> float:
        return min(self.upper.values())

    @property
    def best_lower(self) -> float:
        return max(self.lower.values()) if self.lower else 0.0

    @property
    def gap(self) -> float:
        """best upper / best lower (>= 1; 1 means the Lipschitz constant is known exactly)."""
        lo = self.best_lower
        return self.best_upper / lo if lo > 0 else math.inf

    def to_dict(self) -> dict:
        return {
            "upper": self.upper,
            "lower": self.lower,
            "best_upper": self.best_upper,
            "best_lower": self.best_lower,
            "gap": self.gap,
            "layers": self.layers,
            "times": self.times,
            "notes": self.notes,
        }

    def __str__(self) -> str:
        width = max([14] + [len(str(r["name"])) + 2 for r in self.layers])
        lines = [
            f"{'layer':<{width}}{'type':<18}{'in':<14}{'frobenius':>11}{'operator':>11}"
            f"{'reshaped':>11}{'st.rank':>9}{'const':>9}"
        ]

        def fmt(v):
            return f"{v:11.4g}" if isinstance(v, float) else f"{'':>11}"

        def srank(v):
            return f"{v:9.3g}" if isinstance(v, float) else f"{'':>9}"

        for r in self.layers:
            shape = "x".join(str(s) for s in r["in_shape"])
            lines.append(
                f"{r['name']:<{width}}{r['type'][:17]:<18}{shape:<14}{fmt(r['frobenius'])}"
                f"{fmt(r['operator'])}{fmt(r['reshaped'])}{srank(r.get('stable_rank'))}"
                f"{r['constant']:9.4g}"
            )
        lines.append("upper bounds (certified):")
        for k, v in sorted(self.upper.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {k:<20}{v:12.6g}")
        lines.append("lower bounds (attained):")
        for k, v in self.lower.items():
            lines.append(f"  {k:<20}{v:12.6g}")
        lines.append(f"gap (best upper / best lower): {self.gap:.4g}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class UpperOptions(TypedDict, total=False):
    """The options of :func:`upper_bounds` that :func:`estimate` passes on."""

    dense_limit: int
    lipsdp: bool
    lipsdp_width: int
    lipsdp_iters: int
    dense_flops: float
    check: bool
    lipsdp_time: float | None


def estimate(
    model: nn.Module,
    x: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    lower: bool = True,
    restarts: int = 8,
    steps: int = 20,
    seed: int = 0,
    **upper_options: Unpack[UpperOptions],
) -> LipschitzReport:
    """Certified upper and attained lower bounds of the L2 Lipschitz constant, and their gap.

    ``model``: any module of one tensor input (B, *input_shape) and one tensor output, bounded
    from its graph by :func:`upper_bounds` with ``upper_options`` (dense_limit, lipsdp,
    lipsdp_width, lipsdp_iters, dense_flops, check; its defaults). ``x``: (B, *input_shape)
    inputs where the lower bounds start (random normal inputs when None); ``restarts`` x
    ``steps`` of gradient ascent (:func:`lipgan.analysis.lower.lower_bounds`). The model is
    analysed as a float64 copy in eval mode (the model itself is untouched).
    """
    t0 = time.perf_counter()
    m = prepare(model)
    if x is not None and input_shape is None:
        input_shape = tuple(x.shape[1:])
    shape = _infer_shape(m, input_shape)
    notes: list[str] = []
    upper, layers = upper_bounds(m, shape, _prepared=True, _notes=notes, **upper_options)
    t1 = time.perf_counter()
    lo: dict[str, float] = {}
    if lower:
        if x is None:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(max(restarts, 2), *shape, generator=g, dtype=torch.float64)
        lo = lower_bounds(m, x, restarts=restarts, steps=steps, seed=seed, _prepared=True)
    t2 = time.perf_counter()
    return LipschitzReport(
        upper=upper,
        lower=lo,
        layers=layers,
        times={"upper_s": t1 - t0, "lower_s": t2 - t1},
        notes=notes,
    )
