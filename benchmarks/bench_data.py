"""Loading all of MNIST (both splits) into memory: lipgan.data.load against a plain reference.

Target (issue 2): under 1 s. The reference reads the same cached files with numpy.fromfile and
converts them with torch.from_numpy, with no validation; the ratio shows what validation costs.
Run: .venv/bin/python benchmarks/bench_data.py
"""

from __future__ import annotations

import gzip
import statistics
import time

import numpy as np
import torch

from lipgan import data


def reference_load(folder):
    out = []
    for role, name in data.FILENAMES.items():
        path = folder / name
        if path.exists():
            raw = np.fromfile(path, dtype=np.uint8)
        else:
            with gzip.open(folder / f"{name}.gz", "rb") as fh:
                raw = np.frombuffer(fh.read(), dtype=np.uint8)
        skip = 16 if "images" in role else 8
        arr = torch.from_numpy(raw[skip:].copy())
        out.append(arr.view(-1, 1, 28, 28) if "images" in role else arr.long())
    return out


def main(repeats: int = 7) -> None:
    ds = data.load("mnist")  # make sure it is fetched
    folder = ds.folder
    t_lip, t_ref = [], []
    for _ in range(repeats):  # alternate, so both see the same machine load
        t0 = time.perf_counter()
        d = data.load("mnist", fetch_missing=False)
        t_lip.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = reference_load(folder)
        t_ref.append(time.perf_counter() - t0)
    assert torch.equal(d.train_images, ref[0]) and torch.equal(d.test_labels, ref[3])
    lip, rf = statistics.median(t_lip), statistics.median(t_ref)
    print(f"MNIST load (70,000 images), median of {repeats}, files from {ds.source}")
    verdict = "met" if lip < 1 else "NOT met"
    print(f"  lipgan.data.load : {lip * 1000:8.1f} ms   (target < 1000 ms: {verdict})")
    print(f"  plain reference  : {rf * 1000:8.1f} ms")
    print(f"  ratio lipgan/ref : {lip / rf:8.2f}x")


if __name__ == "__main__":
    main()
