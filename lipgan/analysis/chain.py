"""Certified bounds of one chain ``B_m o phi_{m-1} o ... o phi_1 o B_1`` of leaves.

B_k affine (a run of linear leaves), phi_k elementwise with slopes in [a_k, b_k], and "cut" leaves
(non-elementwise, e.g. max pooling, GroupSort) that split the chain into pieces. Every difference is
``f(x) - f(y) = B_m D_{m-1} ... D_1 B_1 (x - y)`` with data-dependent diagonal D_k whose entries lie
in [a_k, b_k] (mean value theorem; biases cancel). The bounds (proofs in docs/theory.md):

- ``frobenius_product``: prod ||B_k||_F-based bounds * prod L_k;
- ``operator_product``: prod of the certified operator norms * prod L_k;
- ``merged_segments``: D_k = c_k I + r_k S_k with c = (a+b)/2, r = (b-a)/2, ||S_k|| <= 1, the
  product expanded (Combettes & Pesquet 2020 for ReLU) into a sum over subsets of the activations
  of c/r weights times norms of *merged* runs of layers, computed exactly from the run's dense
  matrix when a side is small and its cost is within budget;
- ``lipsdp_partition``: the chain cut at activations into groups; groups with one activation are
  bounded by LipSDP-Neuron (:mod:`lipgan.analysis.lipsdp`), the others by merged segments; the
  best partition by dynamic programming.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lipgan.analysis.leaves import Leaf
from lipgan.analysis.lipsdp import lipsdp_neuron

__all__ = ["chain_bounds"]


@dataclass
class _Chain:
    """Linear blocks B_1..B_m separated by elementwise activations; block k's input shape is
    ``in_shapes[k]`` and the chain's output shape ``in_shapes[m]``."""

    blocks: list[list[Leaf]]
    acts: list[Leaf]
    in_shapes: list[tuple[int, ...]]


def _split(leaves: list[Leaf]) -> tuple[list[_Chain], list[Leaf]]:
    """Cut at non-elementwise nonlinear leaves; inside each piece, blocks between activations."""
    chains, cuts = [], []
    cur = leaves[0].in_shape if leaves else ()
    chain = _Chain([[]], [], [cur])
    for leaf in leaves:
        cur = leaf.out_shape
        if leaf.kind == "linear":
            chain.blocks[-1].append(leaf)
        elif leaf.kind == "act":
            chain.acts.append(leaf)
            chain.blocks.append([])
            chain.in_shapes.append(cur)
        else:
            chain.in_shapes.append(leaf.in_shape)
            chains.append(chain)
            cuts.append(leaf)
            chain = _Chain([[]], [], [cur])
    chain.in_shapes.append(cur)
    chains.append(chain)
    return chains, cuts


def _compose(blocks: list[list[Leaf]]) -> Callable:
    fns = [leaf.lin for block in blocks for leaf in block]

    def f(x):
        for fn in fns:
            x = fn(x)
        return x

    return f


def dense_matrix(f: Callable, shp_in: tuple, shp_out: tuple) -> torch.Tensor:
    """The (out_dim, in_dim) float64 matrix of the linear batched map f, from the smaller side:
    columns f(e_i) when the input is smaller, else rows A^T e_k by one backward per 256 rows."""
    n_in, n_out = math.prod(shp_in), math.prod(shp_out)
    if n_in <= n_out:
        cols = []
        for start in range(0, n_in, 256):
            k = min(256, n_in - start)
            e = torch.zeros(k, n_in, dtype=torch.float64)
            e[torch.arange(k), start + torch.arange(k)] = 1.0
            with torch.no_grad():
                cols.append(f(e.reshape(k, *shp_in)).reshape(k, -1))
        return torch.cat(cols).t()
    rows = []
    for start in range(0, n_out, 256):
        k = min(256, n_out - start)
        x = torch.zeros(k, *shp_in, dtype=torch.float64, requires_grad=True)
        y = f(x).reshape(k, -1)
        e = torch.zeros_like(y)
        e[torch.arange(k), start + torch.arange(k)] = 1.0
        (g,) = torch.autograd.grad(y, x, e, allow_unused=True)  # row k of the matrix: A^T e_k
        rows.append(torch.zeros(k, n_in, dtype=torch.float64) if g is None else g.reshape(k, -1))
    return torch.cat(rows)


class _Segments:
    """Norms of merged runs of blocks B_{i+1} ... B_j of one chain (exact when a side is small)."""

    def __init__(self, chain: _Chain, dense_limit: int, dense_flops: float) -> None:
        self.chain = chain
        self.in_shapes = chain.in_shapes
        self.dense_limit = dense_limit
        self.dense_flops = dense_flops
        self.single = [math.prod(leaf.operator for leaf in b) if b else 1.0 for b in chain.blocks]
        self.cache: dict[tuple[int, int], float] = {}
        self.mats: dict[tuple[int, int], torch.Tensor | None] = {}

    def matrix(self, i: int, j: int) -> torch.Tensor | None:
        """The dense matrix (out_dim, in_dim) of blocks i..j-1 (0-based), None if too costly.

        The cost is counted (multiply-adds of the smaller side's basis through the run), not
        timed, so what is computed depends on the model only."""
        if (i, j) not in self.mats:
            shp_in, shp_out = self.in_shapes[i], self.in_shapes[j]
            small = min(math.prod(shp_in), math.prod(shp_out))
            cost = small * sum(leaf.cost for b in self.chain.blocks[i:j] for leaf in b)
            if small > self.dense_limit or cost > self.dense_flops:
                self.mats[(i, j)] = None
            else:
                self.mats[(i, j)] = dense_matrix(_compose(self.chain.blocks[i:j]), shp_in, shp_out)
        return self.mats[(i, j)]

    def norm(self, i: int, j: int) -> float:
        """Certified bound of ||B_j ... B_{i+1}|| (never above the product of single norms)."""
        if (i, j) in self.cache:
            return self.cache[(i, j)]
        prod = math.prod(self.single[i:j])
        val = prod
        n_leaves = sum(len(b) for b in self.chain.blocks[i:j])
        if n_leaves > 1:  # a single layer's norm is already exact (or certified)
            M = self.matrix(i, j)
            if M is not None:
                val = min(prod, matrix_norm(M))
        self.cache[(i, j)] = val
        return val


def matrix_norm(M: torch.Tensor) -> float:
    """||M||_2 from the smaller Gram matrix (float64 eigvalsh)."""
    small = M @ M.t() if M.shape[0] <= M.shape[1] else M.t() @ M
    return float(torch.linalg.eigvalsh(small).amax().clamp_min(0).sqrt())


def _cr(act: Leaf) -> tuple[float, float]:
    a, b = act.slope
    return abs((a + b) / 2), (b - a) / 2


def _merged_bound(seg: _Segments, i: int, j: int) -> float:
    """sup over D of ||B_j D ... D B_{i+1}|| by the c/r expansion (blocks i..j-1, 0-based)."""
    acts = seg.chain.acts
    # V[t]: weighted sum over the expansions whose last "S" factor sits at activation t-1
    # (t = i means no S yet); activation k sits between blocks k and k+1 (0-based blocks)
    V = {i: 1.0}
    for t in range(i + 1, j + 1):
        total = 0.0
        for s, vs in V.items():
            w = math.prod(_cr(acts[k])[0] for k in range(s, t - 1))
            total += vs * w * seg.norm(s, t)
        if t == j:
            return total
        V[t] = total * _cr(acts[t - 1])[1]
    return V[i]


def _partition(seg: _Segments, lipsdp: dict[tuple[int, int], float]) -> tuple[float, float]:
    """(merged_segments, best partition using LipSDP groups) for one chain."""
    m = len(seg.chain.blocks)
    merged = _merged_bound(seg, 0, m)
    if not lipsdp:
        return merged, merged
    U = {0: 1.0}
    for j in range(1, m + 1):
        best = math.inf
        for i in range(j):
            cut = seg.chain.acts[i - 1].constant if i > 0 else 1.0
            g = _merged_bound(seg, i, j)
            if (i, j) in lipsdp:
                g = min(g, lipsdp[(i, j)])
            best = min(best, U[i] * cut * g)
        U[j] = best
    return merged, min(U[m], merged)


def _lipsdp_groups(
    seg: _Segments, limit: int, iters: int, notes: list[str]
) -> dict[tuple[int, int], float]:
    """LipSDP bounds of every group B_{i+2} D B_{i+1} whose hidden width is at most ``limit``."""
    out = {}
    chain = seg.chain
    for k, act in enumerate(chain.acts):
        h = math.prod(seg.in_shapes[k + 1])
        if h > limit or not chain.blocks[k] or not chain.blocks[k + 1]:
            continue  # too wide, or a side is the identity (nothing to gain over the product)
        W0 = seg.matrix(k, k + 1)
        W1 = seg.matrix(k + 1, k + 2)
        if W0 is None or W1 is None:
            continue
        L, _ = lipsdp_neuron(W0, W1, act.slope, max_iter=iters)
        notes.append(f"LipSDP-Neuron on activation {act.name} (width {h}): {L:.6g}")
        out[(k, k + 2)] = L
    return out


def chain_bounds(
    leaves: list[Leaf],
    dense_limit: int = 1024,
    dense_flops: float = 2e9,
    lipsdp: bool = True,
    lipsdp_width: int = 512,
    lipsdp_iters: int = 300,
    notes: list[str] | None = None,
) -> dict[str, float]:
    """Named certified upper bounds of the chain ``leaves`` (in call order).

    ``frobenius_product``, ``operator_product``, ``merged_segments`` and, where a hidden layer of
    width <= ``lipsdp_width`` sits between two linear blocks, ``lipsdp_partition``. An empty chain
    is the identity (every bound 1)."""
    notes = notes if notes is not None else []
    frob = math.prod(leaf.frobenius_bound for leaf in leaves)
    op = math.prod(leaf.constant for leaf in leaves)
    chains, cuts = _split(leaves)
    merged_total = math.prod(c.constant for c in cuts)
    part_total = merged_total
    any_sdp = False
    for chain in chains:
        seg = _Segments(chain, dense_limit, dense_flops)
        groups = _lipsdp_groups(seg, lipsdp_width, lipsdp_iters, notes) if lipsdp else {}
        any_sdp = any_sdp or bool(groups)
        merged, part = _partition(seg, groups)
        merged_total *= merged
        part_total *= part
    out = {"frobenius_product": frob, "operator_product": op, "merged_segments": merged_total}
    if any_sdp:
        out["lipsdp_partition"] = part_total
    return out
