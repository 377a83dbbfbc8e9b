"""The leaf of one node of a traced graph: a module call, a functional call or a tensor method.

:func:`unary_leaf` classifies a node with one input-dependent argument: a module lipgan
recognises, a functional activation or pooling (through the equivalent module,
:mod:`lipgan.analysis.functional`), a functional conv, or a linear op (reshape, permutation,
indexing, repeat, scaling by a constant, product with a constant matrix, sum or mean over
features) with a certified bound of its norm. Structural nodes (additions of two branches,
concatenation, splits) return None and are composed by :mod:`lipgan.analysis.graph`.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lipgan.analysis import leaves as lv
from lipgan.analysis.functional import equivalent_module, method_module
from lipgan.analysis.tracing import refuse, target_name, user_name

if TYPE_CHECKING:
    from lipgan.analysis.graph import Analysis

__all__ = ["unary_leaf", "in_set"]

RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as"}
RESHAPES |= {"reshape_as", "ravel"}
PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "flip"}
PERMUTES |= {"fliplr", "flipud", "roll", "rot90", "mT"}
IDENTITIES = {"contiguous", "clone", "detach", "to", "type", "float", "double", "cpu", "cuda"}
REPEATS = {"expand", "expand_as", "repeat", "tile", "repeat_interleave", "broadcast_to"}
ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"}
SUB = {operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_", "subtract"}
MUL = {operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", "multiply"}
DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_"}
DIV |= {"true_divide", "divide", torch.divide}
NEG = {operator.neg, torch.neg, torch.negative, "neg", "negative"}
CAT = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack}
MAXMIN = {torch.maximum, torch.minimum, torch.max, torch.min, torch.fmax, torch.fmin}
MAXMIN |= {"maximum", "minimum", "fmax", "fmin"}
SPLITS = {torch.chunk, torch.split, torch.unbind, torch.tensor_split, "chunk", "split"}
SPLITS |= {"unbind", "tensor_split", "split_with_sizes", "unsafe_chunk", "unsafe_split"}
SORTS = {torch.sort, "sort"}  # sorted values: 1-Lipschitz along a feature dimension
# max/min along a dimension: each output is the extreme of one fibre, 1-Lipschitz like a sort
EXTREMA = {torch.max, torch.min, "max", "min", torch.amax, torch.amin, "amax", "amin"}
MATMUL = {operator.matmul, torch.matmul, torch.mm, F.linear, "matmul", "mm", "__matmul__"}
SUMMEAN = {torch.sum, torch.mean, "sum", "mean"}
FCONV = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}


def in_set(node: fx.Node, names: set) -> bool:
    t = node.target
    try:
        return t in names
    except TypeError:
        return False


def _basic_index(idx) -> bool:
    if isinstance(idx, tuple):
        return all(_basic_index(i) for i in idx)
    return idx is None or idx is Ellipsis or isinstance(idx, (int, slice))


def unary_leaf(an: Analysis, node: fx.Node, src: fx.Node) -> lv.Leaf | None:
    """The leaf of a node with one input-dependent argument ``src``; None if structural."""
    xin, yout = an.env[src], an.env[node]
    if not isinstance(xin, torch.Tensor) or not isinstance(yout, torch.Tensor):
        return None
    sin, sout = tuple(xin.shape[1:]), tuple(yout.shape[1:])
    B = xin.shape[0]
    if yout.dim() == 0 or yout.shape[0] != B:
        raise refuse(node, "it mixes or drops the batch dimension")
    args, kwargs = an.val(node.args), an.val(node.kwargs)
    if node.op == "call_module":
        m = an.gm.get_submodule(node.target)
        if len(an.dep_args(node)) != 1 or node.args[0] is not src:
            raise refuse(node, "a module called with several input-dependent arguments")
        leaf = lv.module_leaf(user_name(node.target, an.gm.model), m, sin, sout)
        if an.opts.get("check", True):
            lv.check_leaf(leaf)
        return leaf
    t = node.target
    name = node.name
    # positions of src among the positional args
    pos = [i for i, a in enumerate(node.args) if a is src]
    other = [a for i, a in enumerate(args) if i not in pos]

    def fleaf(fn, label, op, method="exact"):
        leaf = lv.function_leaf(name, fn, label, sin, sout, op, method)
        _per_sample(node, leaf)
        return leaf

    label = target_name(node)
    # functional activations / pooling / pad / interpolate: the equivalent module
    mod = None
    if node.op == "call_function" and pos == [0]:
        mod = equivalent_module(t, tuple(args[1:]), dict(kwargs))
    elif node.op == "call_method" and pos == [0]:
        mod = method_module(t, tuple(args[1:]), dict(kwargs))
    if mod is not None:
        mod = mod.double().eval()
        with torch.no_grad():  # the stand-in must compute what the call computed
            same = mod(xin.clone())
        if same.shape != yout.shape or not torch.allclose(same, yout, rtol=1e-7, atol=1e-10):
            raise refuse(node, f"lipgan's stand-in {type(mod).__name__} differs from it")
        leaf = lv.module_leaf(name, mod, sin, sout)
        leaf.type_name = f"{label} -> {type(mod).__name__}"
        return leaf
    if node.op == "call_function" and t in FCONV and pos == [0]:
        return _fconv(an, node, args, kwargs, sin, sout)
    if node.op == "call_function" and t is F.dropout:
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        if training:
            raise refuse(node, "dropout in training mode is random")
        return fleaf(lambda z: z, label, 1.0)
    if in_set(node, RESHAPES) or t in (torch.flatten, torch.reshape, torch.squeeze):
        if pos != [0]:
            return None
        return fleaf(lambda z, s=sout: z.reshape(z.shape[0], *s), label, 1.0)
    if t is torch.unsqueeze or t is torch.ravel:
        return fleaf(lambda z, s=sout: z.reshape(z.shape[0], *s), label, 1.0)
    if in_set(node, IDENTITIES):
        return fleaf(lambda z: z, label, 1.0)
    if in_set(node, PERMUTES) or t in (
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
        fn = _reapply(node, args, kwargs, pos)
        return fleaf(fn, label, 1.0)
    if node.op == "call_function" and t is operator.getitem:
        idx = args[1]
        if isinstance(xin, torch.Tensor) and _basic_index(idx):
            fn = _reapply(node, args, kwargs, pos)
            return fleaf(fn, "getitem", 1.0 if yout.numel() else 0.0)
        raise refuse(node, "indexing with tensors or lists (it may repeat entries)")
    if in_set(node, REPEATS) or t in (torch.tile, torch.repeat_interleave, torch.broadcast_to):
        ratio = yout.numel() / max(xin.numel(), 1)
        if t in ("expand", "expand_as", "broadcast_to", torch.broadcast_to):
            fn = lambda z, s=sout: z.expand(z.shape[0], *s)  # noqa: E731
        else:
            fn = _reapply(node, args, kwargs, pos)
        return fleaf(fn, label, math.sqrt(ratio))
    if in_set(node, NEG):
        return fleaf(lambda z: -z, label, 1.0)
    if in_set(node, ADD | SUB):
        if len(an.dep_args(node)) != 1:
            return None
        alpha = kwargs.get("alpha", 1)
        ratio = yout.numel() / max(xin.numel(), 1)
        sign = -1.0 if (in_set(node, SUB) and pos == [1]) else 1.0
        scale = abs(alpha) if pos == [1] else 1.0
        c = sign * scale

        def shifted(z, s=sout, c=c):
            return c * torch.broadcast_to(z, (z.shape[0], *s))

        return fleaf(shifted, label, abs(c) * math.sqrt(ratio))
    if in_set(node, MUL | DIV):
        if len(an.dep_args(node)) != 1 or len(pos) != 1:
            raise refuse(
                node,
                "a product of two input-dependent tensors (attention, gating) "
                "has no global Lipschitz constant",
            )
        if in_set(node, DIV) and pos != [0]:
            raise refuse(node, "division by an input-dependent tensor")
        if kwargs.get("rounding_mode") is not None:
            raise refuse(node, "rounded division is not Lipschitz")
        c = other[0] if other else kwargs.get("other")
        cval = c if isinstance(c, torch.Tensor) else torch.tensor(float(c))
        cval = cval.detach().double()
        if in_set(node, DIV):
            if bool((cval == 0).any()):
                raise refuse(node, "division by zero")
            cmax = float((1.0 / cval).abs().max())
        else:
            cmax = float(cval.abs().max()) if cval.numel() else 0.0
        ratio = yout.numel() / max(xin.numel(), 1)
        fn = _reapply(node, args, kwargs, pos)
        return fleaf(fn, label, cmax * math.sqrt(ratio), "max |c|")
    if in_set(node, MATMUL):
        if len(an.dep_args(node)) != 1 or len(pos) != 1:
            raise refuse(
                node,
                "a product of two input-dependent tensors (attention) has "
                "no global Lipschitz constant",
            )
        W = args[1] if pos == [0] else args[0]
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            raise refuse(node, "a product with a constant that is not a matrix")
        sigma = float(torch.linalg.matrix_norm(W.detach().double(), ord=2))
        if t is F.linear:
            fn = lambda z, W=W: F.linear(z, W)  # noqa: E731
        else:
            fn = _reapply(node, args, kwargs, pos)
        return fleaf(fn, label, sigma, "svd")
    if in_set(node, SUMMEAN):
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dim is None or kwargs.get("dtype") is not None:
            raise refuse(node, "a sum or mean over the batch dimension")
        k = xin.numel() / max(yout.numel(), 1)
        op = math.sqrt(k) if in_set(node, {torch.sum, "sum"}) else 1.0 / math.sqrt(k)
        fn = _reapply(node, args, kwargs, pos)
        return fleaf(fn, label, op)
    return None


def _reapply(node, args, kwargs, pos):
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


def _per_sample(node: fx.Node, leaf: lv.Leaf) -> None:
    """The map must act on each sample alone (no batch mixing), on any batch size."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, *leaf.in_shape, generator=g, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = leaf.lin(z)
            y1 = leaf.lin(z[1:2])
    except Exception:
        raise refuse(node, "its arguments depend on the batch size") from None
    if tuple(y.shape) != (3, *leaf.out_shape) or not torch.allclose(y[1:2], y1):
        raise refuse(node, "it mixes samples of the batch")


def _fconv(an: Analysis, node, args, kwargs, sin, sout) -> lv.Leaf:
    cls = FCONV[node.target]
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    full = dict(zip(names, args))
    full.update(kwargs)
    w = full["weight"]
    if not isinstance(w, torch.Tensor) or any(an.dep[a] for a in node.all_input_nodes[1:]):
        raise refuse(node, "a convolution whose weight depends on the input")
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
    leaf.type_name = f"{target_name(node)} -> {cls.__name__}"
    return leaf
