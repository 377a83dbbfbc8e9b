"""torch.fx tracing of a model for the graph analysis, and the names its messages use.

Leaves of the trace are the modules lipgan recognises (``isinstance`` of torch's or lipgan's
classes), modules that declare ``lipschitz_constant``, and torch.nn layers (bounded or refused by
name); containers and user modules are traced through. A forward with control flow on *shapes*
(``if x.shape[1] % 2``, ``len(x)``, as sorting activations of other libraries check their group
size) is traced a second time on a zero input of the analysed shape (torch.fx's ``MetaTracer``):
shapes are then numbers, and the branch taken at that shape is the graph (so the bounds hold for
inputs of that shape, which is what lipgan certifies). A forward with control flow on tensor
*values* cannot be traced either way and is a LipganError.
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.meta_tracer import MetaTracer

from lipgan.analysis import leaves as lv
from lipgan.errors import LipganError

__all__ = ["trace", "user_name", "is_shape_query", "target_name", "refuse"]


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


class _ShapeTracer(_Tracer, MetaTracer):
    """The same leaves, every intermediate computed on a real zero input (so shapes are known):
    MetaTracer's meta tensors, but real, since leaves and parameters are real tensors. A leaf's
    value is what it returned in a real run (``outputs``: module id -> outputs in call order);
    MetaTracer would call it again inside the trace, which recurses for parametrized layers."""

    def __init__(self, outputs: dict[int, list]) -> None:
        super().__init__()
        self._outputs = outputs

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        if kind == "call_module":
            rv = fx.Tracer.create_proxy(self, kind, target, args, kwargs, *rest, **kw)
            done = self._outputs.get(id(self.root.get_submodule(target)))
            if done and isinstance(done[0], torch.Tensor):
                rv.install_tensor_meta(done.pop(0))
            return rv
        rv = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        if kind == "get_attr":  # the parameter itself, not a meta copy of it
            value = self.root
            for atom in str(target).split("."):
                value = getattr(value, atom)
            rv.install_tensor_meta(value)
        return rv


class _Root(nn.Module):
    """The model as a child, so that a model that is itself a leaf (a Linear, a hooked layer)
    is called, hooks and all, like any other leaf."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def _trace_at_shape(root: nn.Module, input_shape: tuple[int, ...]):
    """``root`` traced with meta tensors of shape (2, *input_shape) (batch 2, as the analysis
    evaluates), or None when that fails too."""
    meta = torch.zeros(2, *input_shape, dtype=torch.float64)
    outputs: dict[int, list] = {}

    def record(m, args, out):
        outputs.setdefault(id(m), []).append(out)

    hooks = [m.register_forward_hook(record) for m in root.modules()]
    try:
        with torch.no_grad():
            root(meta)
    except Exception:
        return None
    finally:
        for h in hooks:
            h.remove()
    tracer = _ShapeTracer(outputs)
    try:
        with warnings.catch_warnings():  # "could not compute metadata": a failure below
            warnings.simplefilter("ignore")
            return tracer, tracer.trace(root, meta_args={"x": meta})
    except LipganError:
        raise
    except Exception:
        return None


def trace(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> fx.GraphModule:
    """The fx graph of ``model.forward`` (LipganError when fx cannot trace it). With
    ``input_shape`` (no batch), a forward with control flow on shapes is traced at that shape."""
    tracer = _Tracer()
    root = _Root(model)
    try:
        graph = tracer.trace(root)
    except LipganError:
        raise
    except Exception as exc:
        at_shape = _trace_at_shape(root, tuple(input_shape)) if input_shape else None
        if at_shape is not None:
            tracer, graph = at_shape
            return fx.GraphModule(tracer.root, graph, type(model).__name__)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LipganError(
            f"cannot bound {type(model).__name__}: torch.fx cannot trace its forward ({first}). "
            "Control flow on input values (if/for on a tensor) has no graph to bound; write it "
            "without, or declare the constant of the module that has it with `lipschitz_constant`"
        ) from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def user_name(qualname: str, root: nn.Module) -> str:
    """A module's name as the user wrote it: "0", "layer1.conv" (not "model.0")."""
    q = str(qualname)
    if q == "model":
        return type(root).__name__
    return q[len("model.") :] if q.startswith("model.") else q


_SHAPE_QUERIES = {"size", "dim", "numel", "ndimension", "nelement", "type_as_shape"}


def is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _SHAPE_QUERIES:
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "dtype", "device", "ndim")
    return False


def where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    qual, cls = list(stack.values())[-1]
    qual = qual[len("model.") :] if str(qual).startswith("model.") else qual
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    if qual == "model":  # the model itself
        return f" in {cls_name.split('.')[-1]}.forward"
    return f" in module {qual!r} ({cls_name.split('.')[-1]})"


def target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    return getattr(t, "__name__", None) or getattr(t, "__qualname__", None) or str(t)


def refuse(node: fx.Node, why: str) -> LipganError:
    return lv.cannot(f"{node.name} = {target_name(node)}(...){where(node)}", None, why)
