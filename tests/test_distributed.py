"""lipgan.distributed: 2 gloo processes train exactly what 1 process trains on the same batch.

The reference is always an independent computation: a plain one-process GANTrainer (or
``lipgan.gan.train``) on the same global batch; ranks are compared with each other exactly.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lipgan.errors import LipganError
from lipgan.gan import GANTrainer, TrainConfig
from lipgan.train import distributed as D
from lipgan.train import launch as L

TOL = 1e-5
STEPS = 20


def tiny(method: str, **kw) -> TrainConfig:
    base = dict(
        method=method,
        width=4,
        z_dim=8,
        batch_size=8,
        steps=STEPS,
        threads=1,
        seed=3,
        device="cpu",
        precision="fp32",  # equality across process counts is checked in fp32
        quiet=True,
        tensorboard=False,
        log_every=5,
        lip_every=0,
        layer_every=0,
        fid_every=-1,
        sample_every=1000,
        checkpoint_every=1000,
        keep_every=0,
        n_samples=4,
    )
    base.update(kw)
    return TrainConfig(**base)


def _weights(trainer) -> dict[str, torch.Tensor]:
    sd = {f"critic.{k}": v for k, v in trainer.critic.state_dict().items()}
    sd.update({f"generator.{k}": v for k, v in trainer.generator.state_dict().items()})
    return {k: v.detach().clone() for k, v in sd.items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


# ----------------------------------------------------------------- worker (runs in each rank)


def _worker(rank: int, world: int, init: str, images: torch.Tensor, cfgs: dict, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = {}
        for name, cfg_d in cfgs.items():
            cfg = TrainConfig.from_dict(cfg_d)
            t = D.DistributedTrainer(cfg, images)
            half = STEPS // 2
            for _ in range(half):
                t.train_step()
            mid = copy.deepcopy(t.state_dict())
            logs = [t.train_step() for _ in range(STEPS - half)]
            # a resumed trainer: rank 0's checkpoint state, sent to the others by the load
            t2 = D.DistributedTrainer(cfg, images)
            t2.load_state_dict(mid if rank == 0 else None)
            for _ in range(STEPS - half):
                t2.train_step()
            res[name] = {
                "weights": _weights(t),
                "resumed": _weights(t2),
                "in_sync": D.replicas_in_sync(t),
                "last": {k: float(v) for k, v in logs[-1].items()},
                "gnorm": None
                if t.constraint.last_grad_norm is None
                else t.constraint.last_grad_norm.clone(),
            }
            t.close()
            t2.close()
            del t, t2
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _warm() -> None:
    # The first optimizer imports torch._dynamo (seconds); do it once here, before forking.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def _spawn(world: int, images: torch.Tensor, cfgs: dict, out: Path) -> list[dict]:
    # fork, not spawn: the children start at once instead of importing torch again (~10 s on
    # the shared test machine); safe on CPU since each worker sets 1 thread first.
    _warm()
    init = (out / "store").as_uri()
    mp.start_processes(
        _worker, args=(world, init, images, cfgs, str(out)), nprocs=world, start_method="fork"
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _reference(cfg: TrainConfig, images: torch.Tensor, steps: int = STEPS):
    torch.set_num_threads(1)
    t = GANTrainer(cfg, images)
    logs = [t.train_step() for _ in range(steps)]
    return t, logs


# ----------------------------------------------------------------- tests


def test_two_processes_equal_one_process(mnist, tmp_path):
    """wgan-gp and sn, 20 generator steps (100 critic steps), global batch 8 = 2 x 4."""
    images = mnist.train_images[:512].clone()
    cfgs = {m: tiny(m).to_dict() for m in ("wgan-gp", "sn")}
    ranks = _spawn(2, images, cfgs, tmp_path)
    for method, cfg_d in cfgs.items():
        ref, logs = _reference(TrainConfig.from_dict(cfg_d), images)
        want = _weights(ref)
        r0, r1 = ranks[0][method], ranks[1][method]
        diff = _max_diff(r0["weights"], want)
        assert diff < TOL, f"{method}: DDP vs 1 process differ by {diff}"
        print(f"{method}: max |2 processes - 1 process| after {STEPS} steps = {diff:.2e}")
        # and the run moved: the comparison is not between two untrained networks
        fresh = _weights(GANTrainer(TrainConfig.from_dict(cfg_d), images))
        assert _max_diff(want, fresh) > 1e-3
        # every rank holds the very same tensors, u and v of spectral norm included
        for k in r0["weights"]:
            assert torch.equal(r0["weights"][k], r1["weights"][k]), (method, k)
        assert r0["in_sync"] == 0 and r1["in_sync"] == 0
        if method == "sn":
            uv = [k for k in r0["weights"] if k.endswith(("._u", "._v"))]
            assert len(uv) == 8  # 4 layers x (u, v)
            ref_sd = ref.critic.state_dict()
            for k in uv:
                assert torch.equal(r0["weights"][k], r1["weights"][k])
                kk = k.removeprefix("critic.")
                assert float((r0["weights"][k] - ref_sd[kk]).abs().max()) < TOL
        # the logged scalars are the global batch's
        for key in ("wasserstein", "loss_d", "penalty", "loss_g"):
            assert r0["last"][key] == pytest.approx(float(logs[-1][key]), abs=1e-4)
            assert r0["last"][key] == r1["last"][key]
        if method == "wgan-gp":
            gn = ref.constraint.last_grad_norm
            assert r0["gnorm"].shape == gn.shape == (8,)
            assert torch.allclose(r0["gnorm"], gn, atol=1e-4)
        # resumed at step 10 from rank 0's state == uninterrupted, bit for bit
        for r in (r0, r1):
            for k in r["weights"]:
                assert torch.equal(r["resumed"][k], r["weights"][k]), (method, k)


class _World1:
    """A one-process gloo group in this process (no spawn): cheap checks of the API."""

    def __enter__(self):
        self.tmp = tempfile.TemporaryDirectory()
        dist.init_process_group(
            "gloo", init_method=Path(self.tmp.name, "s").as_uri(), rank=0, world_size=1
        )
        return self

    def __exit__(self, *exc):
        dist.destroy_process_group()
        self.tmp.cleanup()


def test_world_of_one_is_the_plain_trainer(mnist):
    images = mnist.train_images[:256].clone()
    cfg = tiny("wgan-gp", steps=3)
    ref, _ = _reference(cfg, images, 3)
    with _World1():
        t = D.DistributedTrainer(cfg, images)
        for _ in range(3):
            t.train_step()
        assert D.replicas_in_sync(t) == 0
        got = _weights(t)
        # checkpoints hold the plain modules' keys (no DDP "module." prefix)
        assert set(t.state_dict()["critic"]) == set(ref.critic.state_dict())
        t.close()
    assert _max_diff(got, _weights(ref)) < 1e-6
    # bf16 autocast and a composed constraint go through the DDP step as well
    bf = tiny("wgan-gp", steps=1, precision="bf16", constraint="gradient-penalty,frobenius-reg")
    ref_bf, _ = _reference(bf, images, 1)
    with _World1():
        t = D.DistributedTrainer(bf, images)
        out = t.train_step()
        t.close()
    assert all(torch.isfinite(v) for v in out.values())
    assert _max_diff(_weights(t), _weights(ref_bf)) < 1e-6


def test_errors_and_dispatch(mnist, monkeypatch):
    with pytest.raises(LipganError, match="torch.distributed"):
        D.DistributedTrainer(tiny("sn"), mnist.train_images[:64])
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert L.maybe_run(tiny("sn"), 1) is None  # not distributed: the caller trains
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert L.maybe_run(tiny("sn"), 4) is None  # torchrun with one process: plain training
    with pytest.raises(LipganError, match="nproc"):
        L.launch(tiny("sn"), 0)
    monkeypatch.delenv("RANK")
    with pytest.raises(LipganError, match="torchrun"):
        L.main_from_env(tiny("sn"))


def test_launch_run_folder_matches_one_process(tmp_path):
    """`launch` (what `lipgan train --nproc 2` runs): rank 0 writes the run folder once, and
    its checkpoint equals a one-process `lipgan.gan.train` of the same config."""
    from lipgan import gan, runs

    kw = dict(steps=4, log_every=2, checkpoint_every=2)
    one = gan.train(tiny("wgan-gp", out=str(tmp_path / "one"), **kw))
    _warm()
    two = L.launch(tiny("wgan-gp", out=str(tmp_path / "two"), **kw), 2, start_method="fork")
    assert two == tmp_path / "two"
    run = runs.Run(two)
    assert run.read_status()["state"] == "done"
    steps = [int(r["step"]) for r in run.read_metrics()]
    assert steps == [2, 4]  # one row per logged step: only rank 0 logs
    a = runs.load_checkpoint(runs.Run(one).last_checkpoint)
    b = runs.load_checkpoint(run.last_checkpoint)
    assert b["step"] == 4 and b["critic_steps"] == a["critic_steps"]
    for net in ("critic", "generator"):
        assert _max_diff(a[net], b[net]) < TOL
    ma, mb = runs.Run(one).read_metrics(), run.read_metrics()
    for key in ("wasserstein", "loss_d", "loss_g", "penalty"):
        assert mb[-1][key] == pytest.approx(ma[-1][key], abs=1e-4)
    with pytest.raises(LipganError, match="already holds a run"):
        L.launch(tiny("wgan-gp", out=str(two), **kw), 2, start_method="fork")


def test_a_time_limit_is_refused_with_several_processes(tmp_path):
    with pytest.raises(LipganError, match="max-time-s"):
        L.launch(tiny("wgan-gp", out=str(tmp_path / "t"), max_time_s=5.0), 2, start_method="fork")
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_checkpoints_cross_between_one_and_two_processes(tmp_path):
    """A one-process checkpoint resumes under DDP and a DDP one in one process: both end where
    an uninterrupted one-process run does."""
    from lipgan import gan, runs

    kw = dict(log_every=2, checkpoint_every=2)
    _warm()
    ref = gan.train(tiny("sn", steps=8, out=str(tmp_path / "ref"), **kw))
    a, b = tmp_path / "a", tmp_path / "b"
    gan.train(tiny("sn", steps=4, out=str(a), **kw))
    L.launch(tiny("sn", steps=8, out=str(a), **kw), 2, resume=True, start_method="fork")
    L.launch(tiny("sn", steps=4, out=str(b), **kw), 2, start_method="fork")
    gan.train(tiny("sn", steps=8, out=str(b), **kw), resume=True)
    want = runs.load_checkpoint(runs.Run(ref).last_checkpoint)
    for path in (a, b):
        got = runs.load_checkpoint(runs.Run(path).last_checkpoint)
        assert got["step"] == 8
        for net in ("critic", "generator"):
            assert _max_diff(got[net], want[net]) < TOL
        assert [r["step"] for r in runs.Run(path).read_metrics()] == [2, 4, 6, 8]


def test_rollback_is_collective(tmp_path, monkeypatch):
    """A non-finite loss seen on rank 1 only: the averaged losses are non-finite on every rank,
    all ranks roll back to rank 0's checkpoint together and stay identical afterwards."""
    from lipgan import runs

    orig_step, orig_check = D.DistributedTrainer.critic_step, D.replicas_in_sync
    fired = []

    def bad_step(self, real, fake):
        out = orig_step(self, real, fake)
        if self.rank == 1 and self.critic_steps == 12 and not fired:  # generator step 3
            fired.append(1)
            out["loss_d"] = out["loss_d"] * float("nan")
        return out

    def strict(trainer, repair=False):
        if orig_check(trainer, repair=False):
            raise LipganError(f"ranks differ at step {trainer.step}")
        return 0

    # fork: the children inherit these patches
    monkeypatch.setattr(D.DistributedTrainer, "critic_step", bad_step)
    monkeypatch.setattr(D, "replicas_in_sync", strict)
    _warm()
    cfg = tiny("wgan-gp", steps=6, checkpoint_every=2, on_nan="rollback", out=str(tmp_path / "r"))
    path = L.launch(cfg, 2, start_method="fork")
    run = runs.Run(path)
    assert run.read_status()["state"] == "done"
    state = runs.load_checkpoint(run.last_checkpoint)
    assert state["step"] == 6 and state["lr_scale"] == pytest.approx(0.5)
    stop = tiny("wgan-gp", steps=6, checkpoint_every=2, out=str(tmp_path / "s"))
    with pytest.raises(LipganError, match="non-finite loss at generator step 3"):
        L.launch(stop, 2, start_method="fork")


@pytest.mark.slow
def test_launch_resume_matches_uninterrupted(tmp_path):
    from lipgan import runs

    kw = dict(checkpoint_every=3, log_every=3)
    whole = L.launch(tiny("sn", steps=12, out=str(tmp_path / "whole"), **kw), 2)
    part = tmp_path / "part"
    L.launch(tiny("sn", steps=6, out=str(part), **kw), 2)
    L.launch(tiny("sn", steps=12, out=str(part), **kw), 2, resume=True)
    a = runs.load_checkpoint(runs.Run(whole).last_checkpoint)
    b = runs.load_checkpoint(runs.Run(part).last_checkpoint)
    assert a["step"] == b["step"] == 12
    for net in ("critic", "generator"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert [r["step"] for r in runs.Run(part).read_metrics()] == [3, 6, 9, 12]


@pytest.mark.slow
def test_torchrun_module_entry(tmp_path):
    """`torchrun --nproc_per_node=2 -m lipgan train [flags]`."""
    out = tmp_path / "tr"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--standalone", "-m", "lipgan", "train", "--method", "sn", "--width", "4",
        "--z-dim", "8", "--batch-size", "8", "--steps", "3", "--threads", "1",
        "--device", "cpu", "--quiet", "--no-tensorboard", "--fid-every", "-1",
        "--lip-every", "0", "--layer-every", "0", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [str(out)]  # printed by rank 0 only
    from lipgan import runs

    assert runs.Run(out).read_status()["state"] == "done"
