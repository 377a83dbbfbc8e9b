"""CUDA smoke tests: every method trains a few steps on the GPU, in fp32 and bf16 autocast.

Skipped where no CUDA device is present (CI, the 2-core machines); run on the GPU machine by
benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch

from lipgan import gan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

METHODS = list(gan.PRESETS)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_cuda(tmp_path, method, precision):
    cfg = gan.TrainConfig(
        method=method,
        width=8,
        steps=6,
        batch_size=16,
        device="cuda",
        precision=precision,
        out=str(tmp_path / "run"),
        log_every=1,
        lip_every=2,
        layer_every=3,
        sample_every=3,
        checkpoint_every=3,
        keep_every=0,
        fid_every=-1,
        tensorboard=False,
        quiet=True,
    )
    run = gan.train(cfg)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert rows, "no metrics logged"
    for row in rows:
        for key in ("wasserstein", "loss_d", "loss_g"):
            if row.get(key):
                assert math.isfinite(float(row[key])), (key, row)
    assert (run / "samples" / "last.png").stat().st_size > 0
    if gan.resolve(cfg).model == "dcgan28":  # the analysis of a CUDA critic must not fail
        bounds = [r["product_bound"] for r in rows if r.get("product_bound")]
        assert bounds and all(math.isfinite(float(b)) for b in bounds)


def test_resume_on_cuda_continues_the_run(tmp_path):
    kw = dict(
        method="wgan-gp",
        width=8,
        batch_size=16,
        device="cuda",
        out=str(tmp_path / "r"),
        checkpoint_every=2,
        keep_every=0,
        fid_every=-1,
        tensorboard=False,
        quiet=True,
    )
    gan.train(gan.TrainConfig(steps=4, **kw))
    run = gan.train(gan.TrainConfig(steps=8, **kw), resume=True)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state is not None
