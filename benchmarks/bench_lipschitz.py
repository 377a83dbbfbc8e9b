"""Network Lipschitz bounds: the MNIST DCGAN critic and a 784-256-10 ReLU MLP trained on MNIST.

Run: .venv/bin/python benchmarks/bench_lipschitz.py [--threads N] [--epochs E] [--cvxpy]
The MLP is trained here (Adam 1e-3, batch 128, seed 0; nothing cached in the repository) and
bounded by: the product of the layer norms, merged segments, LipSDP-Neuron by lipgan's first-order
method (several time budgets), and (--cvxpy) LipSDP-Neuron as an SDP with cvxpy + SCS, the
reference the issue's target compares against (published for such a net: product 9.31, LipSDP
4.82 after 47 s with MOSEK; Fazlyab et al. 2019). --solver picks another cvxpy solver.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from lipgan import data, lipschitz


def train_mlp(epochs: int, seed: int = 0) -> tuple[nn.Module, float, float]:
    torch.manual_seed(seed)
    ds = data.load("mnist")
    xtr, ytr = ds.split("train")
    xte, yte = ds.split("test")
    xtr = xtr.float().reshape(-1, 784) / 255
    xte = xte.float().reshape(-1, 784) / 255
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    t = time.perf_counter()
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
    return model, acc, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--cvxpy", action="store_true", help="also solve LipSDP with cvxpy (slow)")
    ap.add_argument("--solver", default="SCS")
    ap.add_argument("--skip-critic", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    if not args.skip_critic:
        from lipgan import models

        torch.manual_seed(0)
        critic = models.build("critic", "dcgan28")  # width 64, the WGAN-GP paper's
        x = torch.randn(8, 1, 28, 28).clamp(-1, 1)
        t = time.perf_counter()
        rep = lipschitz.estimate(critic, x, restarts=4, steps=10)
        total = time.perf_counter() - t
        print(
            f"dcgan28 critic (width 64, random init): estimate {total:.1f} s "
            f"(upper {rep.times['upper_s']:.1f} s, lower {rep.times['lower_s']:.1f} s)"
        )
        for k, v in rep.upper.items():
            print(f"  upper {k:<20} {v:.5g}")
        for k, v in rep.lower.items():
            print(f"  lower {k:<20} {v:.5g}")
        print(f"  gap {rep.gap:.3g}")

    model, acc, secs = train_mlp(args.epochs)
    print(f"784-256-10 ReLU MLP: {args.epochs} epochs in {secs:.1f} s, test accuracy {acc:.4f}")
    W0, W1 = model[0].weight, model[2].weight
    t = time.perf_counter()
    up, _ = lipschitz.upper_bounds(model, lipsdp=False)
    t_up = time.perf_counter() - t
    prod = up["operator_product"]
    print(f"  operator product      {prod:.4f}   ({t_up:.2f} s with the merged bound)")
    print(f"  frobenius product     {up['frobenius_product']:.4f}")
    print(f"  merged segments       {up['merged_segments']:.4f}")
    fo = {}
    for budget in (0.5, 1.0, 2.0, 4.0):
        t = time.perf_counter()
        L, _ = lipschitz.lipsdp_neuron(W0, W1, time_limit=budget)
        fo[budget] = (L, time.perf_counter() - t)
        print(f"  LipSDP first-order    {L:.4f}   (budget {budget} s, took {fo[budget][1]:.2f} s)")
    # iterations rather than seconds: comparable across machines and loads
    for iters in (0, 25, 50, 100, 200):
        t = time.perf_counter()
        L, _ = lipschitz.lipsdp_neuron(W0, W1, time_limit=1e9, max_iter=iters)
        took = time.perf_counter() - t
        print(f"  LipSDP first-order    {L:.4f}   ({iters} Adam steps, {took:.2f} s)")
    t = time.perf_counter()
    rep = lipschitz.estimate(model, torch.rand(8, 784), restarts=8, steps=20)
    print(
        f"  estimate(): best upper {rep.best_upper:.4f}, lower jacobian "
        f"{rep.lower['jacobian']:.4f}, pairs {rep.lower['pairs']:.4f}, "
        f"{time.perf_counter() - t:.1f} s"
    )
    if args.cvxpy:
        t = time.perf_counter()
        ref = lipschitz.lipsdp_neuron_cvxpy(W0, W1, solver=args.solver)
        secs = time.perf_counter() - t
        print(f"  LipSDP cvxpy/{args.solver}     {ref:.4f}   ({secs:.1f} s)")
        for budget, (L, took) in fo.items():
            print(
                f"  first-order/{budget}s vs cvxpy: {L / ref:.4f} ({took:.2f} s); "
                f"product / cvxpy {prod / ref:.4f}"
            )


if __name__ == "__main__":
    main()
