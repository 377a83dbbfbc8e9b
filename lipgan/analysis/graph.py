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
  restriction has norm <= 1).

Anything else that depends on the input (a product of two activations as in attention, LayerNorm,
an unknown function, control flow on values that fx cannot trace) raises LipganError naming the
node and the module it sits in.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lipgan.analysis import leaves as lv
from lipgan.analysis.chain import chain_bounds
from lipgan.errors import LipganError

__all__ = ["GraphBounds", "graph_bounds", "trace"]

KINDS = ("frobenius_product", "operator_product", "merged_segments", "lipsdp_partition")


class _Tracer(fx.Tracer):
    """Leaves: modules lipgan recognises or that declare a constant, and torch.nn layers (which
    lipgan then bounds or refuses by name); everything else is traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if lv.declared_constant(m) is not None or lv.known_base(m) is not None:
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return m.__module__.startswith("torch.nn") and not m.__module__.startswith(
            "torch.nn.utils.parametrize"
        )

    def call_module(self, m, forward, args, kwargs):
        if not self.is_leaf_module(m, self.path_of_module(m)) and (
            m._forward_hooks or m._forward_pre_hooks
        ):
            raise LipganError(
                f"cannot bound {type(m).__name__}: it has forward hooks, which a traced graph "
                "does not see; remove them for the analysis"
            )
        return super().call_module(m, forward, args, kwargs)


class _Root(nn.Module):
    """The model as a child, so that a model that is itself a leaf (a Linear, a hooked layer)
    is called, hooks and all, like any other leaf."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def trace(model: nn.Module) -> fx.GraphModule:
    """The fx graph of ``model.forward`` (LipganError when fx cannot trace it)."""
    tracer = _Tracer()
    root = _Root(model)
    try:
        graph = tracer.trace(root)
    except LipganError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LipganError(
            f"cannot bound {type(model).__name__}: torch.fx cannot trace its forward ({first}). "
            "Control flow on input values (if/for on a tensor) has no graph to bound; write it "
            "without, or declare the constant of the module that has it with `lipschitz_constant`"
        ) from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _user_name(qualname: str, root: nn.Module) -> str:
    """A module's name as the user wrote it: "0", "layer1.conv" (not "model.0")."""
    q = str(qualname)
    if q == "model":
        return type(root).__name__
    return q[len("model.") :] if q.startswith("model.") else q


@dataclass
class GraphBounds:
    """Composed certified bounds at the model output and the leaves (for the layer table)."""

    upper: dict[str, float]
    leaves: list[lv.Leaf] = field(default_factory=list)
    chain: bool = False  # the whole model is one path


_SHAPE_QUERIES = {"size", "dim", "numel", "ndimension", "nelement", "type_as_shape"}


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _SHAPE_QUERIES:
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "dtype", "device", "ndim")
    return False


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    qual, cls = list(stack.values())[-1]
    qual = qual[len("model.") :] if str(qual).startswith("model.") else qual
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return f" in module {qual!r} ({cls_name.split('.')[-1]})"


def _target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    return getattr(t, "__name__", None) or getattr(t, "__qualname__", None) or str(t)


def _refuse(node: fx.Node, why: str) -> LipganError:
    return lv.cannot(f"{node.name} = {_target_name(node)}(...){_where(node)}", None, why)


_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as"}
_RESHAPES |= {"reshape_as", "ravel"}
_PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "flip"}
_PERMUTES |= {"fliplr", "flipud", "roll", "rot90", "mT"}
_IDENTITIES = {"contiguous", "clone", "detach", "to", "type", "float", "double", "cpu", "cuda"}
_REPEATS = {"expand", "expand_as", "repeat", "tile", "repeat_interleave", "broadcast_to"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"}
_SUB = {operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_", "subtract"}
_MUL = {operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", "multiply"}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_"}
_DIV |= {"true_divide", "divide", torch.divide}
_NEG = {operator.neg, torch.neg, torch.negative, "neg", "negative"}
_CAT = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack}
_MAXMIN = {torch.maximum, torch.minimum, torch.max, torch.min, torch.fmax, torch.fmin}
_MAXMIN |= {"maximum", "minimum", "fmax", "fmin"}
_SPLITS = {torch.chunk, torch.split, torch.unbind, torch.tensor_split, "chunk", "split"}
_SPLITS |= {"unbind", "tensor_split", "split_with_sizes", "unsafe_chunk", "unsafe_split"}
_MATMUL = {operator.matmul, torch.matmul, torch.mm, F.linear, "matmul", "mm", "__matmul__"}
_SUMMEAN = {torch.sum, torch.mean, "sum", "mean"}
_FCONV = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}


def _key(node: fx.Node):
    return node.target if node.op == "call_method" else node.target


def _in(node: fx.Node, names: set) -> bool:
    t = node.target
    try:
        return t in names
    except TypeError:
        return False


def _basic_index(idx) -> bool:
    if isinstance(idx, tuple):
        return all(_basic_index(i) for i in idx)
    return idx is None or idx is Ellipsis or isinstance(idx, (int, slice))


class _Analysis:
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
            elif _is_shape_query(node):
                self.dep[node] = False
            else:
                self.dep[node] = any(self.dep.get(a, False) for a in node.all_input_nodes)

    def val(self, a):
        return fx.node.map_arg(a, lambda n: self.env[n])

    def dep_args(self, node: fx.Node) -> list[fx.Node]:
        out = []
        for a in node.all_input_nodes:
            if self.dep[a] and a not in out:
                out.append(a)
        return out

    def occurrences(self, node: fx.Node) -> int:
        """How many times input-dependent nodes appear among the arguments (with repeats)."""
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
        return sum(1 for n in found if self.dep[n])

    def value_users(self, node: fx.Node) -> list[fx.Node]:
        return [u for u in node.users if self.dep[u]]

    # ---------------------------------------------------------------- classification
    def unary_leaf(self, node: fx.Node, src: fx.Node) -> lv.Leaf | None:
        """The leaf of a node with one input-dependent argument ``src``; None if structural."""
        xin, yout = self.env[src], self.env[node]
        if not isinstance(xin, torch.Tensor) or not isinstance(yout, torch.Tensor):
            return None
        sin, sout = tuple(xin.shape[1:]), tuple(yout.shape[1:])
        B = xin.shape[0]
        if yout.dim() == 0 or yout.shape[0] != B:
            raise _refuse(node, "it mixes or drops the batch dimension")
        args, kwargs = self.val(node.args), self.val(node.kwargs)
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            if len(self.dep_args(node)) != 1 or node.args[0] is not src:
                raise _refuse(node, "a module called with several input-dependent arguments")
            leaf = lv.module_leaf(_user_name(node.target, self.gm.model), m, sin, sout)
            if self.opts.get("check", True):
                lv.check_leaf(leaf)
            return leaf
        t = node.target
        name = node.name
        # positions of src among the positional args
        pos = [i for i, a in enumerate(node.args) if a is src]
        other = [a for i, a in enumerate(args) if i not in pos]

        def fleaf(fn, label, op, method="exact"):
            leaf = lv.function_leaf(name, fn, label, sin, sout, op, method)
            self._per_sample(node, leaf)
            return leaf

        label = _target_name(node)
        # functional activations / pooling / pad / interpolate: the equivalent module
        mod = None
        if node.op == "call_function" and pos == [0]:
            mod = lv.equivalent_module(t, tuple(args[1:]), dict(kwargs))
        elif node.op == "call_method" and pos == [0]:
            mod = lv.method_module(t, tuple(args[1:]), dict(kwargs))
        if mod is not None:
            mod = mod.double()
            leaf = lv.module_leaf(name, mod, sin, sout)
            leaf.type_name = f"{label} -> {type(mod).__name__}"
            return leaf
        if node.op == "call_function" and t in _FCONV and pos == [0]:
            return self._fconv(node, args, kwargs, sin, sout)
        if node.op == "call_function" and t is F.dropout:
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            if training:
                raise _refuse(node, "dropout in training mode is random")
            return fleaf(lambda z: z, label, 1.0)
        if _in(node, _RESHAPES) or t in (torch.flatten, torch.reshape, torch.squeeze):
            if pos != [0]:
                return None
            return fleaf(lambda z, s=sout: z.reshape(z.shape[0], *s), label, 1.0)
        if t is torch.unsqueeze or t is torch.ravel:
            return fleaf(lambda z, s=sout: z.reshape(z.shape[0], *s), label, 1.0)
        if _in(node, _IDENTITIES):
            return fleaf(lambda z: z, label, 1.0)
        if _in(node, _PERMUTES) or t in (
            torch.permute,
            torch.transpose,
            torch.movedim,
            torch.flip,
            torch.roll,
            torch.t,
            torch.swapaxes,
        ):
            if pos != [0] or any(isinstance(a, torch.Tensor) for a in other):
                return None
            fn = self._reapply(node, args, kwargs, pos)
            return fleaf(fn, label, 1.0)
        if node.op == "call_function" and t is operator.getitem:
            idx = args[1]
            if isinstance(xin, torch.Tensor) and _basic_index(idx):
                fn = self._reapply(node, args, kwargs, pos)
                return fleaf(fn, "getitem", 1.0 if yout.numel() else 0.0)
            raise _refuse(node, "indexing with tensors or lists (it may repeat entries)")
        if _in(node, _REPEATS) or t in (torch.tile, torch.repeat_interleave, torch.broadcast_to):
            ratio = yout.numel() / max(xin.numel(), 1)
            if t in ("expand", "expand_as", "broadcast_to", torch.broadcast_to):
                fn = lambda z, s=sout: z.expand(z.shape[0], *s)  # noqa: E731
            else:
                fn = self._reapply(node, args, kwargs, pos)
            return fleaf(fn, label, math.sqrt(ratio))
        if _in(node, _NEG):
            return fleaf(lambda z: -z, label, 1.0)
        if _in(node, _ADD | _SUB):
            if len(self.dep_args(node)) != 1:
                return None
            alpha = kwargs.get("alpha", 1)
            ratio = yout.numel() / max(xin.numel(), 1)
            sign = -1.0 if (_in(node, _SUB) and pos == [1]) else 1.0
            scale = abs(alpha) if pos == [1] else 1.0
            c = sign * scale

            def shifted(z, s=sout, c=c):
                return c * torch.broadcast_to(z, (z.shape[0], *s))

            return fleaf(shifted, label, abs(c) * math.sqrt(ratio))
        if _in(node, _MUL | _DIV):
            if len(self.dep_args(node)) != 1 or len(pos) != 1:
                raise _refuse(
                    node,
                    "a product of two input-dependent tensors (attention, gating) "
                    "has no global Lipschitz constant",
                )
            if _in(node, _DIV) and pos != [0]:
                raise _refuse(node, "division by an input-dependent tensor")
            if kwargs.get("rounding_mode") is not None:
                raise _refuse(node, "rounded division is not Lipschitz")
            c = other[0] if other else kwargs.get("other")
            cval = c if isinstance(c, torch.Tensor) else torch.tensor(float(c))
            cval = cval.detach().double()
            if _in(node, _DIV):
                if bool((cval == 0).any()):
                    raise _refuse(node, "division by zero")
                cmax = float((1.0 / cval).abs().max())
            else:
                cmax = float(cval.abs().max()) if cval.numel() else 0.0
            ratio = yout.numel() / max(xin.numel(), 1)
            fn = self._reapply(node, args, kwargs, pos)
            return fleaf(fn, label, cmax * math.sqrt(ratio), "max |c|")
        if _in(node, _MATMUL):
            if len(self.dep_args(node)) != 1 or len(pos) != 1:
                raise _refuse(
                    node,
                    "a product of two input-dependent tensors (attention) has "
                    "no global Lipschitz constant",
                )
            W = args[1] if pos == [0] else args[0]
            if not isinstance(W, torch.Tensor) or W.dim() != 2:
                raise _refuse(node, "a product with a constant that is not a matrix")
            sigma = float(torch.linalg.matrix_norm(W.detach().double(), ord=2))
            if t is F.linear:
                fn = lambda z, W=W: F.linear(z, W)  # noqa: E731
            else:
                fn = self._reapply(node, args, kwargs, pos)
            return fleaf(fn, label, sigma, "svd")
        if _in(node, _SUMMEAN):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim is None or kwargs.get("dtype") is not None:
                raise _refuse(node, "a sum or mean over the batch dimension")
            k = xin.numel() / max(yout.numel(), 1)
            op = math.sqrt(k) if _in(node, {torch.sum, "sum"}) else 1.0 / math.sqrt(k)
            fn = self._reapply(node, args, kwargs, pos)
            return fleaf(fn, label, op)
        return None

    def _reapply(self, node, args, kwargs, pos):
        """The op itself with its constant arguments, as a batched function of the input."""
        t = node.target

        def fn(z):
            a = list(args)
            for i in pos:
                a[i] = z
            if node.op == "call_method":
                return getattr(a[0], t)(*a[1:], **kwargs)
            return t(*a, **kwargs)

        return fn

    def _per_sample(self, node: fx.Node, leaf: lv.Leaf) -> None:
        """The map must act on each sample alone (no batch mixing), on any batch size."""
        g = torch.Generator().manual_seed(1)
        z = torch.randn(3, *leaf.in_shape, generator=g, dtype=torch.float64)
        try:
            with torch.no_grad():
                y = leaf.lin(z)
                y1 = leaf.lin(z[1:2])
        except Exception:
            raise _refuse(node, "its arguments depend on the batch size") from None
        if tuple(y.shape) != (3, *leaf.out_shape) or not torch.allclose(y[1:2], y1):
            raise _refuse(node, "it mixes samples of the batch")

    def _fconv(self, node, args, kwargs, sin, sout) -> lv.Leaf:
        cls = _FCONV[node.target]
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
        full = dict(zip(names, args))
        full.update(kwargs)
        w = full["weight"]
        if not isinstance(w, torch.Tensor) or any(self.dep[a] for a in node.all_input_nodes[1:]):
            raise _refuse(node, "a convolution whose weight depends on the input")
        groups = int(full.get("groups", 1))
        conv = cls(
            w.shape[1] * groups,
            w.shape[0],
            tuple(w.shape[2:]),
            stride=full.get("stride", 1),
            padding=full.get("padding", 0),
            dilation=full.get("dilation", 1),
            groups=groups,
            bias=False,
        ).double()
        with torch.no_grad():
            conv.weight.copy_(w.detach())
        leaf = lv.module_leaf(node.name, conv, sin, sout)
        leaf.type_name = f"{_target_name(node)} -> {cls.__name__}"
        return leaf

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
            leaf = self.unary_leaf(node, deps[0]) if unary else None
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
                raise _refuse(node, "internal: an input of this node was not bounded")
            return L[a]

        def ratio(a: fx.Node) -> float:
            va = self.env[a]
            if isinstance(y, torch.Tensor) and isinstance(va, torch.Tensor):
                return y.numel() / max(va.numel(), 1)
            return 1.0

        if _in(node, _ADD | _SUB) and len(deps) >= 1:
            alpha = abs(float(self.val(node.kwargs).get("alpha", 1)))
            out = {k: 0.0 for k in KINDS}
            for i, a in enumerate(node.args[:2]):
                if isinstance(a, fx.Node) and self.dep[a]:
                    c = alpha if i == 1 else 1.0
                    for k in KINDS:
                        out[k] += c * Lof(a)[k] * math.sqrt(ratio(a))
            return out
        if _in(node, _CAT) or _in(node, _MAXMIN):
            if (
                _in(node, _MAXMIN)
                and node.target in (torch.max, torch.min)
                and (len(node.args) < 2 or not isinstance(node.args[1], fx.Node))
            ):
                raise _refuse(node, "a reduction over values (max/min along a dimension)")
            if _in(node, _CAT):
                dim = self.val(node.kwargs).get("dim", node.args[1] if len(node.args) > 1 else 0)
                if node.target in (torch.vstack,) or int(dim) == 0:
                    raise _refuse(node, "a concatenation along the batch dimension")
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
        if _in(node, _SPLITS) and len(deps) == 1 and node.args[0] is deps[0]:
            dim = self.val(node.kwargs).get("dim", None)
            if dim is None:
                pos_dim = 2 if node.target not in (torch.unbind, "unbind") else 1
                dim = self.val(node.args[pos_dim]) if len(node.args) > pos_dim else 0
            if int(dim) == 0:
                raise _refuse(node, "a split along the batch dimension")
            return dict(Lof(deps[0]))
        if node.op == "call_function" and node.target is operator.getitem and len(deps) == 1:
            if isinstance(self.env[deps[0]], (tuple, list)) and isinstance(node.args[1], int):
                return dict(Lof(deps[0]))
        if node.op == "call_module":
            raise _refuse(node, "a module called with several input-dependent arguments")
        if _in(node, _MUL | _DIV | _MATMUL) or node.target in (torch.bmm, torch.einsum):
            raise _refuse(
                node,
                "a product of two input-dependent tensors (attention, gating) "
                "has no global Lipschitz constant",
            )
        raise _refuse(node, "lipgan knows no Lipschitz bound for this operation")


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
    gm = trace(model)
    an = _Analysis(gm, tuple(input_shape), opts)
    if x is None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, *input_shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        an.run(x)
        # the graph must compute what the model computes (hooks, anything fx did not see)
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        y_graph = an.env.get(out) if isinstance(out, fx.Node) else None
        y_model = model(x)
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
