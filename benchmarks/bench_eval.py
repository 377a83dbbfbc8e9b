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
    ap.add_argument(
        "--quality", action="store_true", help="print the reference values of docs/metrics.md"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quality:
        quality()
        return

    from lipgan import metrics
    from lipgan.cli.eval import generate
    from lipgan.metrics import extractor, reference

    torch.manual_seed(0)
    gen = dcgan28_generator()
    n_params = sum(p.numel() for p in gen.parameters())
    if not args.cold:
        reference.get("mnist", "test")  # as after the first `lipgan eval` on this machine

    c0 = time.process_time()
    t0 = time.perf_counter()
    x = generate(gen, gen.z_dim, args.n, seed=0)
    t1 = time.perf_counter()
    net, _ = extractor.load("mnist")
    f, p = extractor.features_and_probs(net, x)
    t2 = time.perf_counter()
    res = metrics.evaluate(x, "mnist", details=True)
    t3 = time.perf_counter()
    c3 = time.process_time()
    total = (t1 - t0) + (t3 - t2)  # generation + evaluate (which recomputes the features)
    print(
        f"generator dcgan28 width 64 ({n_params} parameters), n = {args.n}, threads {args.threads}"
    )
    print(f"generation           {t1 - t0:7.2f} s")
    print(f"features alone       {t2 - t1:7.2f} s  (included in evaluate)")
    print(f"evaluate (all)       {t3 - t2:7.2f} s  features, FID, KID, IS, PRDC, classes")
    print(f"total eval of {args.n}  {total:7.2f} s  (target < 30 s)")
    print(
        f"CPU time of all the above {c3 - c0:.2f} s (user+sys of this process; on a loaded "
        "machine the wall time above includes waiting for a core)"
    )
    # Where evaluate's time goes (run again, separately).
    test = reference.get("mnist", "test")
    real = torch.from_numpy(test.features).double()[: args.n]
    ta = time.perf_counter()
    metrics.scores.frechet_distance(*metrics.scores.mean_cov(f), test.mu, test.sigma)
    tb = time.perf_counter()
    metrics.scores.kid(f, real)
    tc = time.perf_counter()
    metrics.scores.prdc(real, f, real_radii=test.radii if args.n == 10000 else None)
    td = time.perf_counter()
    print(f"  of which FID {tb - ta:.2f} s, KID {tc - tb:.2f} s, PRDC {td - tc:.2f} s")
    print("scores: " + ", ".join(f"{k} {res[k]:.4g}" for k in metrics.EVAL_KEYS))


def quality() -> None:
    """IS of the test set, PRDC of test vs 10k training images, a single-digit set, dead units."""
    import numpy as np
    import scipy.linalg

    from lipgan import data, metrics
    from lipgan.metrics import extractor, reference, scores

    ds = data.load("mnist")
    net, _ = extractor.load("mnist")
    test = reference.get("mnist", "test")
    f = torch.from_numpy(test.features).double()
    with torch.no_grad():
        p = torch.softmax(net.logits(f.float()).double(), 1)
    print(f"IS of the MNIST test set: {scores.inception_score(p):.4f}")
    idx = torch.randperm(60000, generator=torch.Generator().manual_seed(1))[:10000]
    ft, _ = extractor.features_and_probs(net, ds.train_images[idx])
    print("test vs 10k train, k-NN scores:", scores.prdc(ft, f))
    dead = int((f.clamp(min=0) == 0).all(0).sum())
    print(f"units of the 128 that are 0 on every test image after the ReLU: {dead}")
    a, b = f.numpy()[:5000], f.numpy()[5000:]
    ours = scores.frechet_distance(*scores.mean_cov(a), *scores.mean_cov(b))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(
        s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2))
    )
    print(f"FID test[:5000] vs test[5000:]: {ours:.6f} (scipy sqrtm: {ref:.6f})")
    for name, x in (
        ("1000 test images", ds.test_images[:1000]),
        ("1000 test images of digit 1", ds.test_images[ds.test_labels == 1][:1000]),
    ):
        r = metrics.evaluate(x, "mnist", details=True)
        print(name + ": " + ", ".join(f"{k} {r[k]:.4g}" for k in metrics.EVAL_KEYS))


if __name__ == "__main__":
    main()
