"""GroupSort, the gradient-norm-preserving activation of Anil, Lucas & Grosse (2019)."""

from __future__ import annotations

import torch
from torch import nn

from lipgan.errors import LipganError


class GroupSort(nn.Module):
    """Sort each group of ``group_size`` consecutive channels (along ``dim``), ascending.

    ``(B, C, ...) -> (B, C, ...)``, ``C`` a multiple of ``group_size``. The map is a
    data-dependent permutation, continuous at ties: 1-Lipschitz in the L2 norm (sorting never
    increases ``||x - y||``) and gradient-norm preserving (its Jacobian is a permutation almost
    everywhere). ``group_size=2`` is MaxMin, the variant Anil et al. (2019) use for most
    experiments. ``dim`` should be a feature dimension: along the batch (0) the map still is
    1-Lipschitz on the whole batch, but it mixes samples, so it is not a per-sample function.
    """

    def __init__(self, group_size: int = 2, dim: int = 1) -> None:
        super().__init__()
        if group_size < 2:
            raise LipganError("GroupSort group_size must be at least 2")
        self.group_size = group_size
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim % x.dim()
        c = x.shape[dim]
        if c % self.group_size:
            raise LipganError(
                f"GroupSort({self.group_size}) needs a channel count divisible by "
                f"{self.group_size}; got {c} channels (change the layer width)"
            )
        shape = (*x.shape[:dim], c // self.group_size, self.group_size, *x.shape[dim + 1 :])
        g = x.reshape(shape)
        if self.group_size == 2:
            a, b = g.unbind(dim + 1)
            # max/min is cheaper than a sort, and its gradient is the same permutation
            out = torch.stack((torch.minimum(a, b), torch.maximum(a, b)), dim + 1)
        else:
            out = g.sort(dim=dim + 1).values
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, dim={self.dim}"


def groupsort_activations(module: nn.Module, group_size: int = 2) -> int:
    """Replace every ReLU-like activation module in ``module`` by :class:`GroupSort`.

    Returns the number replaced. Output squashers (Tanh, Sigmoid) are left alone; activations
    called functionally inside ``forward`` cannot be found and stay as they are.
    """
    kinds = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.PReLU, nn.CELU, nn.SELU)
    count = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, kinds):
                setattr(parent, name, GroupSort(group_size))
                count += 1
    return count
