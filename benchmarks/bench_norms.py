"""Per-layer operator norms of the dcgan28 critic (width 32 and 64): lipgan against plain PyTorch.

Run: .venv/bin/python benchmarks/bench_norms.py [--threads N] [--widths 32 64] [--max-dense E]

For every linear layer of the critic (the LeakyReLUs have constant 1) it prints, side by side:
lipgan's certified upper bound (``lipgan.analysis.operators.layer_bound``, method named), the
reference, their ratio, lipgan's attained lower bound (Lanczos), and the CPU seconds
(``time.process_time``) of each. The reference is the exact norm from the dense matrix built
from torch's own forward on the identity basis (float64, ``torch.linalg.matrix_norm(ord=2)``)
where that matrix has at most ``--max-dense`` entries; else a plain-PyTorch power iteration on
``A^T A`` (autograd, 2000 steps), a value from below, marked ``power``. On a shared machine the
times are inflated by other processes: compare the columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from lipgan.analysis.operators import layer_bound
from lipgan.models.gan28 import critic


def cpu(fn, *args, **kw):
    t = time.process_time()
    out = fn(*args, **kw)
    return out, time.process_time() - t


def dense_reference(layer: nn.Module, shape) -> float:
    """Exact ||A|| from torch's forward on the identity basis (bias removed), plain PyTorch."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        M = (layer(eye) - layer(torch.zeros(1, *shape, dtype=torch.float64))).reshape(n, -1)
    return float(torch.linalg.matrix_norm(M, ord=2))


def power_reference(layer: nn.Module, shape, steps: int = 2000) -> float:
    """Plain power iteration on A^T A by autograd: sigma from below."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *shape, generator=g, dtype=torch.float64)
    zero = torch.zeros(1, *shape, dtype=torch.float64)
    with torch.no_grad():
        b = layer(zero)
    for _ in range(steps):
        x = (x / x.norm()).requires_grad_(True)
        y = layer(x) - b
        (gx,) = torch.autograd.grad(0.5 * y.square().sum(), x)
        x = gx.detach()
    x = x / x.norm()
    with torch.no_grad():
        return float((layer(x) - b).norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--max-dense", type=float, default=3e7, help="largest dense reference")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; CPU seconds")
    head = (
        f"{'width':>5} {'layer':<28} {'input':<11} {'method':<6} {'certified':>10} "
        f"{'reference':>10} {'kind':<6} {'cert/ref':>8} {'lower/ref':>9} {'bound s':>8} "
        f"{'lower s':>8} {'ref s':>8} {'ref/bound':>9}"
    )
    print(head)
    for width in args.widths:
        torch.manual_seed(0)
        model = critic(width).double().eval()
        shape = (1, 28, 28)
        x = torch.zeros(1, *shape, dtype=torch.float64)
        total_bound = total_lower = 0.0
        for layer in model:
            in_shape = tuple(x.shape[1:])
            with torch.no_grad():
                x = layer(x)
            if not isinstance(layer, (nn.Conv2d, nn.Linear)):
                continue
            b, t_bound = cpu(layer_bound, layer, in_shape, lower=False)
            lb, t_lower = cpu(layer_bound, layer, in_shape, lower=True)
            t_lower = max(t_lower - t_bound, 0.0)
            n_in, n_out = math.prod(in_shape), x.numel()
            if n_in * n_out <= args.max_dense:
                ref, t_ref = cpu(dense_reference, layer, in_shape)
                kind = "dense"
            else:
                ref, t_ref = cpu(power_reference, layer, in_shape)
                kind = "power"
            total_bound += t_bound
            total_lower += t_lower
            name = repr(layer).split("(")[0] + "(" + repr(layer).split("(", 1)[1][:20]
            print(
                f"{width:>5} {name:<28} {'x'.join(map(str, in_shape)):<11} {b.method:<6} "
                f"{b.upper:>10.6f} {ref:>10.6f} {kind:<6} {b.upper / ref:>8.5f} "
                f"{lb.lower / ref:>9.5f} {t_bound:>8.3f} {t_lower:>8.3f} {t_ref:>8.3f} "
                f"{t_ref / max(t_bound, 1e-9):>9.1f}"
            )
        print(
            f"{width:>5} all layers: certified bounds {total_bound:.3f} s, Lanczos lower bounds "
            f"{total_lower:.3f} s (CPU)"
        )


if __name__ == "__main__":
    main()
