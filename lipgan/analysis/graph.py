"""Certified Lipschitz bounds of any ``nn.Module`` composed along its computation graph.

The model's ``forward`` is traced by ``torch.fx`` symbolic tracing (modules lipgan recognises, and
modules that declare ``lipschitz_constant``, stay leaves; containers and user modules are traced
through) and evaluated once on a random float64 batch to record every node's shape. Every node
that depends on the input gets ``L(node)``, a certified Lipschitz constant of the map from the
model input to that node (in L2, per sample):

- a *path* of unary nodes (modules, functional activations, reshapes, scalings, slicing) whose
  intermediate values have no other user is bounded as one chain by
  :func:`lipgan.analysis.chain.chain_bounds` (merged segments, LipSDP), times ``L`` of its start;
- ``a + b``, ``a - b``: ``|alpha_a| L_a sqrt(k_a) + |alpha_b| L_b sqrt(k_b)`` (triangle
  inequality; ``k`` = how many times broadcasting repeats each element);
- ``cat``/``stack`` of branches, elementwise ``maximum``/``minimum``: ``sqrt(sum_i k_i L_i^2)``
  (``||[f(x)-f(y); g(x)-g(y)]||^2 <= (L_f^2 + L_g^2) ||x-y||^2``, whatever the branches share);
- ``chunk``/``split``/``unbind`` and indexing of their results: ``L`` of the input (a coordinate
  restriction has norm <= 1);
- the values of ``torch.sort`` / ``x.sort`` and of ``max``/``min``/``amax``/``amin`` along feature
  dimensions: ``L`` of the input (a sort, or the extreme of each fibre, is 1-Lipschitz); a use of
  the indices, or one along the batch dimension, is refused.

Anything else that depends on the input (a product of two activations as in attention, LayerNorm,
an unknown function, control flow on values that fx cannot trace) raises LipganError naming the
node and the module it sits in.

The tracing lives in :mod:`lipgan.analysis.tracing`, the leaf of one node in
:mod:`lipgan.analysis.nodes` (functional calls through :mod:`lipgan.analysis.functional`); this
module evaluates the graph and composes the bounds.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from lipgan.analysis import leaves as lv
from lipgan.analysis.chain import chain_bounds
from lipgan.analysis.nodes import (
    ADD,
    CAT,
    DIV,
    EXTREMA,
    MATMUL,
    MAXMIN,
    MUL,
    SORTS,
    SPLITS,
    SUB,
    in_set,
    unary_leaf,
)
from lipgan.analysis.tracing import is_shape_query, refuse, trace
from lipgan.errors import LipganError

__all__ = ["GraphBounds", "graph_bounds", "trace"]

KINDS = ("frobenius_product", "operator_product", "merged_segments", "lipsdp_partition")


@dataclass
class GraphBounds:
    """Composed certified bounds at the model output and the leaves (for the layer table)."""

    upper: dict[str, float]
    leaves: list[lv.Leaf] = field(default_factory=list)
    chain: bool = False  # the whole model is one path


def _shape_of_second(node: fx.Node) -> bool:
    """``a.view_as(b)``, ``a.reshape_as(b)``, ``a.expand_as(b)``: only b's shape is used."""
    return node.op == "call_method" and node.target in ("view_as", "reshape_as", "expand_as")


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes whose values (not only their shapes) the node computes with."""
    if _shape_of_second(node):
        return [a for a in node.args[:1] if isinstance(a, fx.Node)]
    return node.all_input_nodes


class Analysis:
    """The traced graph evaluated once: every node's value and whether it depends on the input."""

    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...], opts: dict) -> None:
        self.gm = gm
        self.shape = tuple(input_shape)
        self.opts = opts
        self.env: dict[fx.Node, object] = {}
        self.dep: dict[fx.Node, bool] = {}
        self.notes: list[str] = opts.get("notes", [])

    # ---------------------------------------------------------------- evaluation
    def run(self, x: torch.Tensor) -> None:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            names = ", ".join(n.name for n in placeholders)
            raise LipganError(
                f"lipgan bounds models of one input; this forward takes {len(placeholders)} "
                f"({names}); wrap it in a module of one input"
            )
        interp = fx.Interpreter(self.gm, garbage_collect_values=False)
        interp.run(x)
        self.env = dict(interp.env)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.dep[node] = True
            elif is_shape_query(node):
                self.dep[node] = False
            else:
                self.dep[node] = any(self.dep.get(a, False) for a in _value_inputs(node))

    def val(self, a):
        return fx.node.map_arg(a, lambda n: self.env[n])

    def dep_args(self, node: fx.Node) -> list[fx.Node]:
        out = []
        for a in _value_inputs(node):
            if self.dep[a] and a not in out:
                out.append(a)
        return out

    def occurrences(self, node: fx.Node) -> int:
        """How many times input-dependent nodes appear among the arguments (with repeats)."""
        found: list[fx.Node] = []
        args = node.args[:1] if _shape_of_second(node) else (node.args, node.kwargs)
        fx.node.map_arg(args, lambda n: found.append(n) or n)
        return sum(1 for n in found if self.dep[n])

    def value_users(self, node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if self.dep[u]]

    # ---------------------------------------------------------------- composition
    def compose(self) -> GraphBounds:
        nodes = list(self.gm.graph.nodes)
        leaf_of: dict[fx.Node, lv.Leaf] = {}
        src_of: dict[fx.Node, fx.Node] = {}
        for node in nodes:
            if not self.dep[node] or node.op in ("placeholder", "output"):
                continue
            deps = self.dep_args(node)
            unary = len(deps) == 1 and self.occurrences(node) == 1  # x + x is not unary
            leaf = unary_leaf(self, node, deps[0]) if unary else None
            if leaf is not None:
                leaf_of[node], src_of[node] = leaf, deps[0]
        # paths: a unary node continues its source's path when it is the source's only user
        path: dict[fx.Node, tuple[fx.Node, list[lv.Leaf]]] = {}
        interior: set[fx.Node] = set()
        for node in nodes:
            if node not in leaf_of:
                continue
            s = src_of[node]
            if s in leaf_of and len(self.value_users(s)) == 1:
                base, ls = path.pop(s)
                interior.add(s)
                path[node] = (base, ls + [leaf_of[node]])
            else:
                path[node] = (s, [leaf_of[node]])
        L: dict[fx.Node, dict[str, float]] = {}
        one = {k: 1.0 for k in KINDS}
        any_sdp = False
        out_node = None
        for node in nodes:
            if node.op == "output":
                out_node = node
                continue
            if not self.dep[node] or node in interior:
                continue
            if node.op == "placeholder":
                L[node] = dict(one)
            elif node in path:
                base, ls = path[node]
                pb = chain_bounds(ls, **self._chain_opts())
                any_sdp = any_sdp or "lipsdp_partition" in pb
                L[node] = _times(L[base], pb)
            else:
                L[node] = self.structural(node, L)
        assert out_node is not None
        res = out_node.args[0]
        if isinstance(res, (tuple, list, dict)):
            raise LipganError(
                "lipgan bounds models with one tensor output; this forward returns a "
                f"{type(res).__name__} (wrap the model to return one tensor)"
            )
        if isinstance(res, fx.Node) and self.dep[res]:
            upper = dict(L[res])
        else:
            upper = {k: 0.0 for k in KINDS}  # the output does not depend on the input
        if not any_sdp:
            upper.pop("lipsdp_partition")
        leaves = [leaf_of[n] for n in nodes if n in leaf_of]
        placeholder = next(n for n in nodes if n.op == "placeholder")
        is_chain = isinstance(res, fx.Node) and (
            res is placeholder or (res in path and path[res][0] is placeholder)
        )
        return GraphBounds(upper, leaves, is_chain)

    def _chain_opts(self) -> dict:
        keys = ("dense_limit", "dense_flops", "lipsdp", "lipsdp_width", "lipsdp_iters", "notes")
        return {k: self.opts[k] for k in keys if k in self.opts}

    def structural(self, node: fx.Node, L: dict) -> dict[str, float]:
        deps = self.dep_args(node)
        y = self.env[node]

        def Lof(a: fx.Node) -> dict[str, float]:
            if a not in L:
                raise refuse(node, "internal: an input of this node was not bounded")
            return L[a]

        def ratio(a: fx.Node) -> float:
            va = self.env[a]
            if isinstance(y, torch.Tensor) and isinstance(va, torch.Tensor):
                return y.numel() / max(va.numel(), 1)
            return 1.0

        if in_set(node, ADD | SUB) and len(deps) >= 1:
            alpha = abs(float(self.val(node.kwargs).get("alpha", 1)))
            out = {k: 0.0 for k in KINDS}
            for i, a in enumerate(node.args[:2]):
                if isinstance(a, fx.Node) and self.dep[a]:
                    c = alpha if i == 1 else 1.0
                    for k in KINDS:
                        out[k] += c * Lof(a)[k] * math.sqrt(ratio(a))
            return out
        if in_set(node, SORTS | EXTREMA) and len(deps) == 1 and node.args[0] is deps[0]:
            kwargs = self.val(node.kwargs)
            dim = kwargs.get("dim", self.val(node.args[1]) if len(node.args) > 1 else None)
            if dim is None and in_set(node, SORTS):
                dim = -1
            dims = dim if isinstance(dim, (tuple, list)) else (dim,)
            if dims and all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
                return self.sort(node, deps[0], dims, Lof(deps[0]))
        if in_set(node, CAT) or in_set(node, MAXMIN):
            if (
                in_set(node, MAXMIN)
                and node.target in (torch.max, torch.min)
                and (len(node.args) < 2 or not isinstance(node.args[1], fx.Node))
            ):
                raise refuse(node, "a reduction over values (max/min along a dimension)")
            if in_set(node, CAT):
                dim = self.val(node.kwargs).get("dim", node.args[1] if len(node.args) > 1 else 0)
                ndim = y.dim() if isinstance(y, torch.Tensor) else 1
                if node.target in (torch.vstack,) or int(dim) % max(ndim, 1) == 0:
                    raise refuse(node, "a concatenation along the batch dimension")
                items = [a for a in node.args[0] if isinstance(a, fx.Node) and self.dep[a]]
                counts = {a: items.count(a) for a in items}
                r = {a: 1.0 for a in items}
            else:
                items = deps
                counts = {a: 1 for a in items}
                r = {a: ratio(a) for a in items}
            out = {}
            for k in KINDS:
                out[k] = math.sqrt(sum(counts[a] * r[a] * Lof(a)[k] ** 2 for a in counts))
            return out
        if in_set(node, SPLITS) and len(deps) == 1 and node.args[0] is deps[0]:
            dim = self.val(node.kwargs).get("dim", None)
            if dim is None:
                pos_dim = 2 if node.target not in (torch.unbind, "unbind") else 1
                dim = self.val(node.args[pos_dim]) if len(node.args) > pos_dim else 0
            src_val = self.env[deps[0]]
            if int(dim) % max(src_val.dim(), 1) == 0:
                raise refuse(node, "a split along the batch dimension")
            return dict(Lof(deps[0]))
        if node.op == "call_function" and node.target is operator.getitem and len(deps) == 1:
            if isinstance(self.env[deps[0]], (tuple, list)) and isinstance(node.args[1], int):
                return dict(Lof(deps[0]))
        if node.op == "call_function" and node.target is getattr and len(deps) == 1:
            if in_set(deps[0], SORTS | EXTREMA) and node.args[1] == "values":
                return dict(Lof(deps[0]))
        if node.op == "call_module":
            raise refuse(node, "a module called with several input-dependent arguments")
        if in_set(node, MUL | DIV | MATMUL) or node.target in (torch.bmm, torch.einsum):
            raise refuse(
                node,
                "a product of two input-dependent tensors (attention, gating) "
                "has no global Lipschitz constant",
            )
        raise refuse(node, "lipgan knows no Lipschitz bound for this operation")

    def sort(self, node: fx.Node, src: fx.Node, dims, L_src: dict[str, float]) -> dict[str, float]:
        """``torch.sort(x, dim)``, ``torch.max(x, dim)``, ``x.amin(dims)``, ...: the values sort
        (or take the extreme of) each fibre along ``dims``; sorting never increases ``||x - y||``
        (rearrangement inequality) and ``|max a - max b| <= max |a - b|`` per fibre, so their
        constant is that of ``x``. Indices are not continuous: a use of them is refused."""
        if any(int(d) % max(self.env[src].dim(), 1) == 0 for d in dims):
            raise refuse(node, "a sort or max/min along the batch dimension (it mixes samples)")
        if not isinstance(self.env[node], tuple):
            return dict(L_src)  # amax / amin: the values alone
        for u in node.users:
            values = (u.target is operator.getitem and u.args[1] == 0) or (
                u.target is getattr and u.args[1] == "values"
            )
            if not (u.op == "call_function" and values):
                raise refuse(node, "its indices are used: they are not a Lipschitz function")
        return dict(L_src)


def _times(base: dict[str, float], pb: dict[str, float]) -> dict[str, float]:
    pb = dict(pb)
    pb.setdefault("lipsdp_partition", pb["merged_segments"])
    out = {k: base[k] * pb[k] for k in KINDS}
    # the minimum of certified bounds is certified: tighter kinds never exceed looser ones
    out["merged_segments"] = min(
        out["merged_segments"], out["operator_product"], out["frobenius_product"]
    )
    out["lipsdp_partition"] = min(out["lipsdp_partition"], out["merged_segments"])
    return out


def graph_bounds(
    model: nn.Module, input_shape: tuple[int, ...], x: torch.Tensor | None = None, **opts
) -> GraphBounds:
    """Certified bounds of ``model`` (a float64, eval-mode copy) on inputs of ``input_shape``.

    ``opts``: dense_limit, dense_flops, lipsdp, lipsdp_width, lipsdp_iters (passed to
    :func:`lipgan.analysis.chain.chain_bounds` for every path), notes (a list to append to),
    check (run the per-leaf consistency check, default True)."""
    gm = trace(model, tuple(input_shape))
    an = Analysis(gm, tuple(input_shape), opts)
    if x is None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, *input_shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        an.run(x)
        # the graph must compute what the model computes (hooks, anything fx did not see)
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        y_graph = an.env.get(out) if isinstance(out, fx.Node) else None
        y_model = model(x)
    if not isinstance(y_model, torch.Tensor):
        raise LipganError(
            "lipgan bounds models with one tensor output; this forward returns a "
            f"{type(y_model).__name__} (wrap the model to return one tensor)"
        )
    if not (
        isinstance(y_graph, torch.Tensor)
        and isinstance(y_model, torch.Tensor)
        and y_graph.shape == y_model.shape
        and torch.allclose(y_graph, y_model, rtol=1e-6, atol=1e-9)
    ):
        raise LipganError(
            f"cannot bound {type(model).__name__}: its traced graph does not compute its output "
            "(a hook, or state that changes between calls); lipgan would bound the wrong map"
        )
    return an.compose()
