"""Benchmark: `lipgan eval` of 10k generated samples (generation, features, every metric).

Generates ``--n`` samples with a dcgan28-sized generator (WGAN-GP's MNIST generator, width 64,
z 128; untrained weights: the cost does not depend on them), then runs
:func:`lipgan.metrics.evaluate` exactly as ``lipgan eval RUN`` does, and prints the time of each
stage. The reference statistics are cached on disk by the first call (not timed, as in normal
use); ``--cold`` times that call too. Target: under 30 s on 2 CPU cores.

    .venv/bin/python benchmarks/bench_eval.py [--n 10000] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def dcgan28_generator(z_dim: int = 128, width: int = 64) -> nn.Module:
    """lipgan's registered dcgan28 generator, or the same shapes built here if it is missing."""
    try:
        from lipgan import models

        return models.build("generator", "dcgan28", width=width, z_dim=z_dim)
    except Exception:  # the registry or the model may not exist yet in this checkout
        d = width
        net = nn.Sequential(
            nn.Linear(z_dim, 4 * 4 * 4 * d),
            nn.ReLU(),
            nn.Unflatten(1, (4 * d, 4, 4)),
            nn.ConvTranspose2d(4 * d, 2 * d, 5, 2, 2, output_padding=1),
            nn.ReLU(),
        )
        net.append(_Crop7())
        for layer in (
            nn.ConvTranspose2d(2 * d, d, 5, 2, 2, output_padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(d, 1, 5, 2, 2, output_padding=1),
            nn.Tanh(),
        ):
            net.append(layer)
        net.z_dim = z_dim
        return net


class _Crop7(nn.Module):
    def forward(self, x):
        return x[:, :, :7, :7]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="also time the reference statistics")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lipgan import metrics
    from lipgan.cli.eval import generate
    from lipgan.metrics import extractor, reference

    torch.manual_seed(0)
    gen = dcgan28_generator()
    n_params = sum(p.numel() for p in gen.parameters())
    if not args.cold:
        reference.get("mnist", "test")  # as after the first `lipgan eval` on this machine

    t0 = time.perf_counter()
    x = generate(gen, gen.z_dim, args.n, seed=0)
    t1 = time.perf_counter()
    net, _ = extractor.load("mnist")
    f, p = extractor.features_and_probs(net, x)
    t2 = time.perf_counter()
    res = metrics.evaluate(x, "mnist", details=True)
    t3 = time.perf_counter()
    total = (t1 - t0) + (t3 - t2)  # generation + evaluate (which recomputes the features)
    print(
        f"generator dcgan28 width 64 ({n_params} parameters), n = {args.n}, threads {args.threads}"
    )
    print(f"generation           {t1 - t0:7.2f} s")
    print(f"features alone       {t2 - t1:7.2f} s  (included in evaluate)")
    print(f"evaluate (all)       {t3 - t2:7.2f} s  features, FID, KID, IS, PRDC, classes")
    print(f"total eval of {args.n}  {total:7.2f} s  (target < 30 s)")
    # Where evaluate's time goes (run again, separately).
    test = reference.get("mnist", "test")
    real = torch.from_numpy(test.features).double()[: args.n]
    ta = time.perf_counter()
    metrics.scores.frechet_distance(*metrics.scores.mean_cov(f), test.mu, test.sigma)
    tb = time.perf_counter()
    metrics.scores.kid(f, real)
    tc = time.perf_counter()
    metrics.scores.prdc(real, f)
    td = time.perf_counter()
    print(f"  of which FID {tb - ta:.2f} s, KID {tc - tb:.2f} s, PRDC {td - tc:.2f} s")
    print("scores: " + ", ".join(f"{k} {res[k]:.4g}" for k in metrics.EVAL_KEYS))


if __name__ == "__main__":
    main()
