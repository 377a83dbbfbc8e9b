"""The run loop around the trainer: user constraints recorded as themselves, resume refusals,
signals, and run folders written by the previous version."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_gan
import torch

from lipgan import cli, runs
from lipgan import constraints as C
from lipgan.errors import LipganError
from lipgan.train import loop
from lipgan.train.config import TrainConfig

DATA = Path(__file__).parent / "data" / "v0.1.0"
tiny = test_gan.tiny  # the fixture: a folder of 256 MNIST digits in the IDX layout
_cfg = test_gan._cfg


@C.register("test-noisy-decay")
class NoisyDecay(C.Constraint):
    """A user's method with an option, randomness and state of its own: the penalty
    ``lam * u * sum ||W||^2`` with ``u ~ U[0, 1)`` drawn from the trainer's generator, and a
    running count of its calls kept in its state_dict."""

    def __init__(self, lam: float = 1e-3) -> None:
        super().__init__()
        self.lam = float(lam)
        self.calls = 0

    def penalty(self, critic, real, fake=None, *, generator=None, shard=None):
        self.calls += 1
        u = C.per_sample_rand(1, generator=generator, device=real.device)[0]
        return self.lam * u * sum(p.square().sum() for p in critic.parameters())

    def state_dict(self, module):
        return {**super().state_dict(module), "calls": self.calls}

    def load_state_dict(self, module, state):
        super().load_state_dict(module, state)
        self.calls = int(state["calls"])


def _weights(path: Path) -> dict:
    state = runs.load_checkpoint(runs.Run(path).last_checkpoint)
    return {f"{n}.{k}": v for n in ("generator", "critic") for k, v in state[n].items()}


def _ema(path: Path) -> dict:
    return runs.load_checkpoint(runs.Run(path).last_checkpoint)["ema"]["module"]


def test_a_registered_user_constraint_trains_resumes_bit_exactly_and_is_recorded(tiny, tmp_path):
    whole = loop.train(_cfg(tiny, tmp_path, steps=4, out=str(tmp_path / "whole")),
                       constraint=NoisyDecay(lam=2e-3))  # fmt: skip
    cfg = runs.Run(whole).read_config()
    assert (cfg["constraint"], cfg["constraint_options"]) == ("test-noisy-decay", {"lam": 2e-3})
    state = runs.load_checkpoint(runs.Run(whole).last_checkpoint)
    assert state["models"]["constraint"] == {"name": "test-noisy-decay", "options": {"lam": 2e-3}}
    assert state["extra"]["critic"]["calls"] == 4 * 5  # n_critic 5

    part = tmp_path / "part"
    loop.train(_cfg(tiny, tmp_path, steps=2, out=str(part)), constraint=NoisyDecay(lam=2e-3))
    # Resumed from its folder alone, as `lipgan train --resume` does: rebuilt by name.
    again = TrainConfig.from_dict({**runs.Run(part).read_config(), "steps": 4})
    loop.train(again, resume=True)
    a, b = _weights(whole), _weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = _ema(whole), _ema(part)  # the generator's moving average (on by default) too
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema = runs.load_network(whole / "generator_ema.safetensors", "generator")
    raw = runs.load_network(whole / "generator.safetensors", "generator")
    assert ema.state_dict().keys() == raw.state_dict().keys()
    assert not all(torch.equal(ema.state_dict()[k], raw.state_dict()[k]) for k in ema.state_dict())
    # last.pt names the EMA export like the other two; the manifest checks it on every load
    assert set(state["exports"]) >= {"generator.safetensors", "generator_ema.safetensors"}
    folder = runs.RunFolder(whole)
    assert folder.stale_exports(folder.load_checkpoint()) == []
    net = folder.load_export("generator_ema")
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in net.state_dict().items())
    assert runs.load_checkpoint(runs.Run(part).last_checkpoint)["extra"]["critic"]["calls"] == 20


def test_an_unregistered_constraint_is_refused_before_the_folder_exists(tiny, tmp_path):
    class Mine(C.Constraint):
        pass

    out = tmp_path / "mine"
    with pytest.raises(LipganError, match="register its class"):
        loop.train(_cfg(tiny, tmp_path, out=str(out)), constraint=Mine())
    assert not out.exists()


def test_compose_specs_round_trip():
    c = C.get("gradient-penalty,frobenius-reg")
    spec = C.checked_spec(c)
    assert spec == {"name": "compose", "options": {"methods": [
        {"name": "gradient-penalty", "options": {"lam": 10.0}},
        {"name": "frobenius-reg", "options": {"lam": 5e-5, "form": "sum"}},
    ]}}  # fmt: skip
    assert C.from_spec(spec).spec() == spec and C.from_spec(spec).needs_input_grad


# --------------------------------------------------------------------------- resume refusals


def _md5s(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _cli(tiny, out, *flags) -> list[str]:
    return ["train", "--dataset", tiny, "--width", "4", "--batch-size", "8", "--quiet",
            "--no-tensorboard", "--fid-every", "-1", "--threads", "1", "--layer-every", "0",
            "--out", str(out), *flags]  # fmt: skip


@pytest.fixture(scope="module")
def two_runs(tiny, tmp_path_factory):
    """Two finished 2-step runs, shared by the tests that check a refused resume leaves them
    untouched (each compares the folders' checksums before and after)."""
    root = tmp_path_factory.mktemp("two-runs")
    a, b = root / "a", root / "b"
    assert cli.main(_cli(tiny, a, "--steps", "2")) == 0
    assert cli.main(_cli(tiny, b, "--steps", "2", "--seed", "9", "--lr-d", "3e-4")) == 0
    return a, b


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--resume", "{a}", "--out", "{b}", "--steps", "6"], "a run is resumed in its own folder"),
        (["--resume", "{a}", "--method", "sn"], "was trained with method 'wgan-gp', not 'sn'"),
        (["--resume", "{a}", "--constraint", "spectral-norm"], "was trained with constraint"),
        (["--resume", "{a}", "--seed", "3"], "was trained with seed 0, not 3"),
        (["--resume", "{a}", "--steps", "1"], "is already at generator step 2"),
    ],
)
def test_resume_refuses_to_change_what_the_run_is(two_runs, capsys, flags, words):
    a, b = two_runs
    before = {a: _md5s(a), b: _md5s(b)}
    argv = ["train", *(f.format(a=a, b=b) for f in flags), "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    assert {a: _md5s(a), b: _md5s(b)} == before  # neither folder touched


# --------------------------------------------------------------------------- signals


def _signal_argv(tiny, out) -> list[str]:
    return _cli(tiny, out, "--steps", "100000", "--checkpoint-every", "100000",
                "--keep-every", "0", "--log-every", "1", "--lip-every", "0")  # fmt: skip


def _check_interrupted_and_resume(out, err: str) -> int:
    """The run ``out`` stopped by a signal: marked resumable, its steps kept; it resumes."""
    assert err.strip().splitlines()[-1] == "lipgan: interrupted"
    status = runs.Run(out).read_status()
    assert (status["state"], status["reason"]) == ("failed", "interrupted")
    state = runs.load_checkpoint(runs.Run(out).last_checkpoint)
    assert state["step"] == status["step"] >= 2  # the steps before the signal are kept
    step = state["step"]
    assert cli.main(["train", "--resume", str(out), "--steps", str(step + 1), "--quiet"]) == 0
    assert runs.Run(out).read_status()["state"] == "done"
    return step


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_the_step_and_leaves_the_run_resumable(
    tiny, tmp_path, monkeypatch, capsys, sig
):
    """The signal arrives in the middle of generator step 3 (sent to this process by the step
    itself): the step finishes, is checkpointed, and the command exits 130."""
    from lipgan.train.gan import GANTrainer

    out, real_step = tmp_path / "sig", GANTrainer.train_step

    def step_then_signal(self):
        result = real_step(self)
        if self.step == 3:
            os.kill(os.getpid(), sig)  # handled here, in the main thread, before the return
        return result

    def unhandled(signum, frame):  # what the signal does when the run has no handler of its own
        raise AssertionError(f"signal {signum} reached the handler installed before the run")

    monkeypatch.setattr(GANTrainer, "train_step", step_then_signal)
    before = signal.signal(sig, unhandled)
    try:
        assert cli.main(_signal_argv(tiny, out)) == 130
        assert signal.getsignal(sig) is unhandled  # the run gave the handler back
    finally:
        signal.signal(sig, before)
    monkeypatch.undo()
    assert _check_interrupted_and_resume(out, capsys.readouterr().err) == 3


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_from_another_process_checkpoints_and_leaves_the_run_resumable(
    tiny, tmp_path, sig
):
    out = tmp_path / "sig"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    argv = _signal_argv(tiny, out)
    proc = subprocess.Popen([sys.executable, "-m", "lipgan", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            m = out / "metrics.csv"
            if m.is_file() and len(m.read_text().splitlines()) >= 3:  # header + 2 steps
                break
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    _check_interrupted_and_resume(out, err)


# --------------------------------------------------------------------------- older run folders


@pytest.mark.parametrize("method", ["sn", "snr"])
def test_run_folders_of_the_previous_version_resume_and_continue_as_it_would(tmp_path, method):
    """tests/data/v0.1.0/{sn,snr}: 2-step runs written by lipgan 0.1.0 (checkpoint state format
    1: constraints named by string, spectral-norm flags and the regularizer's u, v in the old
    layout). Resumed to step 4 here they equal 0.1.0's own uninterrupted 4-step run
    (continued_to_step4.json holds the sha256 of each of its tensors)."""
    run = tmp_path / method
    shutil.copytree(DATA / method, run)
    argv = ["train", "--resume", str(run), "--steps", "4", "--quiet"]
    assert cli.main(argv) == 0
    want = json.loads((DATA / "continued_to_step4.json").read_text())[method]
    got = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
           for k, v in _weights(run).items()}  # fmt: skip
    # every tensor 0.1.0 had is equal (newer buffers, e.g. SN's certificate, may be added)
    assert {k: got.get(k) for k in want} == want


def test_a_checkpoint_from_a_newer_version_is_refused_by_name(tmp_path, capsys):
    run = tmp_path / "sn"
    shutil.copytree(DATA / "sn", run)
    state = runs.load_checkpoint(runs.Run(run).last_checkpoint)
    state["state_format"] = 99
    runs.save_checkpoint(runs.Run(run).last_checkpoint, state)
    assert cli.main(["train", "--resume", str(run), "--steps", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint state format 99" in err and "formats 1 to 2" in err
