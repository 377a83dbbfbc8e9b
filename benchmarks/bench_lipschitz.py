"""Whole-network Lipschitz bounds: the dcgan28 critic and a 784-256-10 ReLU MLP.

Run: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_lipschitz.py [--threads 2] [--cvxpy]
     [--widths 32,64] [--epochs 0] [--dense-ref] [--one-thread] [--conv-seeds 0,1,2]

1. dcgan28 critic (lipgan/models, random init, seed 0): the layer table plus every certified
   upper bound (``lipschitz.upper_bounds``: per-layer bounds, products, merged segments), timed
   cold (first call in the process: includes torch's one-time kernel set-up) and warm (a second
   critic of the same shape), wall and CPU seconds, side by side with the 220 s that lipgan's
   chain walker took at width 64 before issue 17 (issue 17, finding 9: measured by the peer
   review at commit 0fcca42; not re-run here, it takes minutes). ``--dense-ref`` adds the plain
   PyTorch reference: each layer's dense matrix from its own forward on the identity basis and
   its exact norm (eigvalsh of the smaller Gram matrix; A^T by a VJP when the output is smaller),
   where the smaller side is <= 6272 (the whole width-64 critic: ~330 CPU s).
2. 784-256-10 ReLU MLP trained here on MNIST (``--epochs 3``, seed 0; ``--epochs 0``: fixed-seed
   random weights): operator product, merged segments, lipgan's deterministic first-order
   LipSDP-Neuron (iteration counts, no clock) against a *certified lower bound* on the SDP
   optimum from the dual side (``lipsdp.lipsdp_dual_ascent``: Burer-Monteiro ascent on the dual,
   every iterate a valid bound by weak duality), so ``first-order / dual`` bounds the true ratio
   to LipSDP from above (issue 17's target: within 1.05x in < 5 s). ``--cvxpy`` also solves the
   SDP with cvxpy (``--solver``, default CLARABEL; at 784-256 Clarabel asked for 138 GB and SCS
   took 1822 s before, so this is for small nets).
3. ``--conv-seeds 0,1,2``: each conv's certified bound over a plain-PyTorch power iteration
   (3000 steps on ``A^T A`` through the layer's forward and autograd, a value from below) at
   those seeds, so the ratio bounds ``bound / exact`` from above.
4. ``--one-thread``: the critic analysis inside ``lipgan.analysis.convmap.one_thread()`` (the
   conv's large Cholesky still gets the threads), what a 2nd thread costs the small linear algebra.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch
from torch import nn

from lipgan import lipschitz

OLD_CRITIC_SECONDS = 220.0  # issue 17 finding 9 (width 64, lipgan before issue 17)


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def dense_layer_norms(critic: nn.Module, shape, limit: int = 6272) -> dict[str, float | None]:
    """Plain PyTorch: every linear layer's dense matrix from its own forward, exact norm."""
    out: dict[str, float | None] = {}
    x = torch.zeros(1, *shape, dtype=torch.float64)
    m = critic.double().eval()
    for name, layer in m.named_children():
        in_shape = tuple(x.shape[1:])
        with torch.no_grad():
            y = layer(x)
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            n_in, n_out = math.prod(in_shape), y[0].numel()
            if min(n_in, n_out) > limit:
                out[name] = None
            elif n_in <= n_out:
                eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *in_shape)
                with torch.no_grad():
                    zero = torch.zeros_like(x)  # the affine offset is the output at 0
                    A = (layer(eye).reshape(n_in, -1) - layer(zero).reshape(1, -1)).t()
                out[name] = float(torch.linalg.eigvalsh(A.t() @ A)[-1].sqrt())
            else:  # A^T on the output basis by one vector-Jacobian product of torch's forward
                _, vjp = torch.func.vjp(layer, torch.zeros(n_out, *in_shape, dtype=torch.float64))
                eye = torch.eye(n_out, dtype=torch.float64).reshape(n_out, *y.shape[1:])
                At = vjp(eye)[0].detach().reshape(n_out, n_in)
                out[name] = float(torch.linalg.eigvalsh(At @ At.t())[-1].sqrt())
        x = y
    return out


def _count_layer_bound_cpu() -> dict:
    """Wrap operators.layer_bound to sum its CPU seconds (per-layer share of the analysis)."""
    from lipgan.analysis import leaves, operators

    spent = {"cpu": 0.0, "calls": []}
    inner = operators.layer_bound

    def timed(module, shape, *a, **k):
        c, t = time.process_time(), time.perf_counter()
        try:
            return inner(module, shape, *a, **k)
        finally:
            cpu, wall = time.process_time() - c, time.perf_counter() - t
            spent["cpu"] += cpu
            spent["calls"].append((type(module).__name__, tuple(shape), wall, cpu))

    leaves.operators.layer_bound = timed  # leaves calls it through the module attribute
    return spent


def bench_critic(width: int, dense_ref: bool, wrap: bool = False) -> None:
    from lipgan import models
    from lipgan.analysis.convmap import one_thread

    spent = _count_layer_bound_cpu()

    shape = (1, 28, 28)

    def analysis(seed: int):
        torch.manual_seed(seed)
        critic = models.build("critic", "dcgan28", width=width)
        with one_thread() if wrap else contextlib.nullcontext():
            upper, table = lipschitz.upper_bounds(critic, shape)  # the layer table comes with it
        return critic, table, upper

    (critic, table, upper), cold, cold_cpu = _timed(lambda: analysis(0))
    spent["cpu"], spent["calls"] = 0.0, []
    _, warm, warm_cpu = _timed(lambda: analysis(1))
    per_layer = spent["cpu"]
    how = " (whole call inside convmap.one_thread())" if wrap else ""
    print(f"dcgan28 critic width {width}: layer table + upper bounds{how}")
    print(f"  cold {cold:7.2f} s wall {cold_cpu:7.2f} s CPU; warm {warm:7.2f} s wall "
          f"{warm_cpu:7.2f} s CPU")  # fmt: skip
    print(f"  warm: per-layer bounds (layer_bound) {per_layer:.2f} s CPU, graph + chain bounds "
          f"{warm_cpu - per_layer:.2f} s CPU")  # fmt: skip
    for name, shp, wall, cpu in spent["calls"]:
        if wall >= 0.01:
            print(f"    {name} on {'x'.join(map(str, shp))}: {wall:.2f} s wall {cpu:.2f} s CPU")
    if width == 64:
        old = OLD_CRITIC_SECONDS
        print(f"  before issue 17: {old:.0f} s -> speed-up {old / warm:.0f}x (warm wall), "
              f"{old / cold:.0f}x (cold wall)")  # fmt: skip
    for k, v in upper.items():
        print(f"  upper {k:<20} {v:.6g}")
    ref = None
    if dense_ref:
        ref, t_ref, c_ref = _timed(lambda: dense_layer_norms(critic, shape))
        print(f"  plain PyTorch dense per-layer norms: {t_ref:.1f} s wall {c_ref:.1f} s CPU "
              f"(ratio to lipgan warm: {t_ref / warm:.1f}x)")  # fmt: skip
    print(f"  {'layer':<8}{'type':<12}{'method':<10}{'operator':>12}{'dense':>12}{'ratio':>9}")
    for r in table:
        if r["operator"] is None:
            continue
        d = ref.get(r["name"]) if ref else None
        ratio = f"{r['operator'] / d:9.5f}" if d else f"{'':>9}"
        dtext = f"{d:12.6f}" if d else f"{'':>12}"
        print(f"  {r['name']:<8}{r['type']:<12}{r['operator_method'] or '':<10}"
              f"{r['operator']:12.6f}{dtext}{ratio}")  # fmt: skip


def mnist_mlp(epochs: int, seed: int = 0) -> tuple[nn.Module, str]:
    """The MLP of the earlier benchmark (same code and seed, so the same weights: check the
    operator product 20.4233 at 3 epochs). Training is not bit-reproducible across thread counts."""
    if epochs <= 0:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
        return model, "fixed-seed random weights (torch default init, seed 0)"
    from lipgan import data

    torch.manual_seed(seed)
    ds = data.load("mnist")
    xtr, ytr = ds.split("train")
    xte, yte = ds.split("test")
    xtr = xtr.float().reshape(-1, 784) / 255
    xte = xte.float().reshape(-1, 784) / 255
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 128):
            idx = perm[i : i + 128]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx].long())
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    return model, f"trained {epochs} epochs on MNIST (Adam 1e-3, batch 128, seed {seed}), " \
        f"test accuracy {acc:.4f}"


def lipsdp_reference(W0, W1, solver: str = "CLARABEL", slope=(0.0, 1.0), **kw):
    """LipSDP-Neuron by cvxpy (this benchmark's own formulation, not lipgan's solvers): returns
    ``(primal, dual_lower)``: the solver's sqrt(rho) and a *certified lower bound* on the SDP value
    from the solver's dual matrix, repaired to exact feasibility (``lipsdp.lipsdp_dual_bound``).

    With ``W0 = U S V^T`` (rank r) the LMI is restricted to range(W0^T) (x = V z): blocks (h, r),
    ``[[W1^T W1 - 2T, (a+b) T R], [(a+b) R^T T, -rho I - 2ab R^T T R]] <= 0``, ``R = U S``.
    """
    import cvxpy as cp
    import numpy as np

    from lipgan.analysis.lipsdp import lipsdp_dual_bound

    a, b = slope
    W0n, W1n = W0.detach().double().numpy(), W1.detach().double().numpy()
    U, S, Vt = np.linalg.svd(W0n, full_matrices=False)
    keep = S > S.max() * 1e-12
    R, V = U[:, keep] * S[keep], Vt[keep].T
    h, r = R.shape
    t = cp.Variable(h, nonneg=True)
    rho = cp.Variable()
    T = cp.diag(t)
    M = cp.bmat([[W1n.T @ W1n - 2 * T, (a + b) * T @ R],
                 [(a + b) * R.T @ T, -rho * np.eye(r) - 2 * a * b * R.T @ T @ R]])  # fmt: skip
    lmi = 0.5 * (M + M.T) << 0
    cp.Problem(cp.Minimize(rho), [lmi]).solve(solver=solver, **kw)
    Z = np.asarray(lmi.dual_value)
    ev, Q = np.linalg.eigh(0.5 * (Z + Z.T))
    F = Q * np.sqrt(np.clip(ev, 0, None))  # Z's PSD part, Z = F F^T
    F2, F1 = torch.from_numpy(F[:h]), torch.from_numpy(V @ F[h:])  # back to x coordinates
    lower = lipsdp_dual_bound(W0, W1, F1, F2, slope)
    return math.sqrt(max(float(rho.value), 0.0)), lower


def power_reference(layer: nn.Module, shape, steps: int = 3000, seed: int = 0) -> float:
    """Plain PyTorch: power iteration on ``A^T A`` through the layer's own forward and autograd
    (float64, bias removed), a value from below (``||A v||`` of a unit v)."""
    layer = layer.double()
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, *shape, generator=g, dtype=torch.float64)
    zero = torch.zeros(1, *shape, dtype=torch.float64)
    with torch.no_grad():
        b = layer(zero)
    for _ in range(steps):
        v = (v / v.norm()).requires_grad_(True)
        y = layer(v) - b
        (g_v,) = torch.autograd.grad(0.5 * y.square().sum(), v)
        v = g_v.detach()
    v = v / v.norm()
    with torch.no_grad():
        return float((layer(v) - b).norm())


def conv_seed_sweep(width: int, seeds: list[int]) -> None:
    """Each conv's certified bound (``layer_bound``, method named) over the plain-PyTorch power
    value, per seed: the ratio bounds bound / exact from above."""
    from lipgan import models
    from lipgan.analysis.operators import layer_bound

    print(f"dcgan28 critic width {width}: certified conv bound / power iteration (3000 steps)")
    for seed in seeds:
        torch.manual_seed(seed)
        critic = models.build("critic", "dcgan28", width=width)
        shapes = [(1, 28, 28), (width, 14, 14), (2 * width, 7, 7)]
        convs = [m for m in critic.modules() if isinstance(m, nn.Conv2d)]
        cells = []
        for layer, shape in zip(convs, shapes):
            b = layer_bound(layer, shape, lower=False)
            cells.append(f"{b.method} {b.upper / power_reference(layer, shape):.5f}")
        print(f"  seed {seed}: " + "  ".join(cells))


def bench_mlp(epochs: int, cvxpy: bool, solver: str) -> None:
    from lipgan.analysis.lipsdp import lipsdp_dual_ascent

    model, how = mnist_mlp(epochs)
    W0, W1 = model[0].weight, model[2].weight
    print(f"784-256-10 ReLU MLP, {how}")
    (up, _), t_up, c_up = _timed(lambda: lipschitz.upper_bounds(model, (784,)))
    print(f"  upper_bounds: {t_up:.2f} s wall {c_up:.2f} s CPU")
    for k, v in up.items():
        print(f"  upper {k:<20} {v:.6f}")
    fo = {}
    for iters in (0, 100, 300):
        (L, _), t, c = _timed(lambda iters=iters: lipschitz.lipsdp_neuron(W0, W1, max_iter=iters))
        fo[iters] = L
        print(f"  LipSDP first-order {iters:4d} steps: {L:.6f}  ({t:.2f} s wall, {c:.2f} s CPU)")
    # the reference: a certified lower bound on the SDP optimum from the dual side (any dual
    # point bounds it by weak duality), so first-order / dual >= the true ratio to LipSDP
    low, t, c = _timed(lambda: lipsdp_dual_ascent(W0, W1, rank=32, steps=3000))
    print(f"  LipSDP dual lower bound (rank 32, 3000 steps): {low:.6f}  ({t:.1f} s wall, "
          f"{c:.1f} s CPU)")  # fmt: skip
    for iters, L in fo.items():
        print(f"  first-order {iters} steps / dual lower bound: {L / low:.6f} (>= true ratio)")
    print(f"  operator product / dual lower bound: {up['operator_product'] / low:.5f}")
    if cvxpy:
        (ref, dual), t, c = _timed(lambda: lipsdp_reference(W0, W1, solver=solver))
        print(f"  LipSDP cvxpy/{solver}: primal {ref:.6f}, certified dual {dual:.6f}  "
              f"({t:.1f} s wall, {c:.1f} s CPU)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--widths", default="32,64")
    ap.add_argument("--epochs", type=int, default=3, help="0: fixed-seed random weights")
    ap.add_argument("--cvxpy", action="store_true", help="also solve LipSDP with cvxpy (slow)")
    ap.add_argument("--solver", default="CLARABEL")
    ap.add_argument("--dense-ref", action="store_true", help="plain PyTorch dense reference")
    ap.add_argument("--one-thread", action="store_true",
                    help="run the critic analysis inside convmap.one_thread() (big Cholesky: all)")
    ap.add_argument("--conv-seeds", default="",
                    help="e.g. 0,1,2,3,4: each conv's bound / power iteration at these seeds")
    ap.add_argument("--skip-critic", action="store_true")
    ap.add_argument("--skip-mlp", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if not args.skip_critic:
        for w in (int(s) for s in args.widths.split(",")):
            bench_critic(w, args.dense_ref, args.one_thread)
            if args.conv_seeds:
                conv_seed_sweep(w, [int(x) for x in args.conv_seeds.split(",")])
    if not args.skip_mlp:
        bench_mlp(args.epochs, args.cvxpy, args.solver)


if __name__ == "__main__":
    main()
