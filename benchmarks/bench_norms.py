"""Operator norms of a 128 -> 256 3x3 conv on 14x14 inputs: exact FFT, power/Lanczos, Gram bound.

Run: .venv/bin/python benchmarks/bench_norms.py [--threads N] [--repeats R]
Prints the value and the median wall time of each method, and the plain-PyTorch references
(batched SVD of all frequency matrices; torch's spectral_norm on the reshaped kernel).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lipgan import norms


def timed(fn, repeats):
    times, val = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        val = fn()
        times.append(time.perf_counter() - t)
    return val, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (128, 14, 14)
    zero = nn.Conv2d(128, 256, 3, padding=1)
    circ = nn.Conv2d(128, 256, 3, padding=1, padding_mode="circular")
    circ.weight.data.copy_(zero.weight.data)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}")
    print("layer: Conv2d 128->256 3x3 on 128x14x14, same random kernel for both paddings")
    rows = []
    v, t = timed(lambda: norms.conv_operator_norm(circ, shape, "fft"), args.repeats)
    rows.append(("circular  fft (exact)", v, t))

    def svd_ref():  # plain torch: batched SVD of every per-frequency matrix
        m = norms.conv_frequency_matrices(circ.weight, (14, 14))
        return float(torch.linalg.matrix_norm(m, ord=2).max())

    v, t = timed(svd_ref, args.repeats)
    rows.append(("circular  batched SVD (reference)", v, t))
    p, t = timed(lambda: norms.conv_operator_norm(zero, shape, "power"), args.repeats)
    rows.append(("zeros     power/Lanczos (lower)", p, t))
    v, t = timed(lambda: norms.conv_operator_norm(zero, shape, "gram"), args.repeats)
    rows.append(("zeros     gram (certified upper)", v, t))
    gram = v
    v, t = timed(lambda: norms.conv_operator_norm(zero, shape, "gram", gram_grids=1), args.repeats)
    rows.append(("zeros     gram, one grid", v, t))
    v, t = timed(lambda: norms.conv_operator_norm(zero, shape, "reshaped"), args.repeats)
    rows.append(("zeros     reshaped kernel (SN-GAN)", v, t))
    reshaped = v

    def sn_ref():  # what torch's spectral_norm computes: 1 iteration per call on the reshape
        pi = norms.PowerIteration(n_iter=1)
        return pi(zero.weight)[0]

    v, t = timed(sn_ref, args.repeats)
    rows.append(("zeros     1 power step on reshape", v, t))
    for name, val, sec in rows:
        print(f"  {name:<36} {val:10.6f}   {sec * 1e3:9.1f} ms")
    print(f"gram / power = {gram / p:.5f}   reshaped / power = {reshaped / p:.4f}")

    # the MNIST critic's layers (dcgan28, width 64): gram against power, reshaped against power
    print("dcgan28 critic layers (random init): gram/power, reshaped/power")
    for c_in, c_out, n in [(1, 64, 28), (64, 128, 14), (128, 256, 7)]:
        layer = nn.Conv2d(c_in, c_out, 5, stride=2, padding=2)
        s = (c_in, n, n)
        pw = norms.conv_operator_norm(layer, s, "power")
        gr = norms.conv_operator_norm(layer, s, "gram")
        rs = norms.conv_operator_norm(layer, s, "reshaped")
        print(
            f"  {c_in:>3}->{c_out:<3} on {n:>2}x{n:<2}  gram/power {gr / pw:.4f}  "
            f"reshaped/power {rs / pw:.3f}"
        )


if __name__ == "__main__":
    main()
