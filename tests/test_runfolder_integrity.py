"""Run folders that never lie: checksums, write order, one writer, OS errors, no partial files.

Each test is a red-team finding (docs/design.md, "Run folders"): bit flips in checkpoints and
exports, the stale export after a kill, a second writer, an unwritable path, a file where a
folder is expected, a full disk on a small tmpfs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from lipgan import models, runs
from lipgan.cli import main
from lipgan.errors import LipganError
from lipgan.runs import Export, RunFolder

KW = {"width": 4, "z_dim": 16}
CKW = {"width": 4}


def _trainer_state(step: int = 3, seed: int = 0) -> tuple[dict, dict]:
    """A checkpoint shaped like the trainer's (networks, Adam moments, every RNG state), and the
    exports that go with it. One thread, so that this process and a child process compute the
    same bits whatever thread count an earlier test left."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _trainer_state_1(step, seed)
    finally:
        torch.set_num_threads(threads)


def _trainer_state_1(step: int, seed: int) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    g = models.build("generator", "dcgan28", **KW)
    d = models.build("critic", "dcgan28", **CKW)
    opt_g, opt_d = torch.optim.Adam(g.parameters()), torch.optim.Adam(d.parameters())
    for _ in range(step):
        d(g(torch.randn(2, KW["z_dim"]))).mean().backward()
        opt_g.step()
        opt_d.step()
    version, internal, gauss = random.getstate()
    st = np.random.get_state()
    state = {
        "step": step,
        "critic_steps": 5 * step,
        "lr_scale": 1.0,
        "models": {"generator": {"name": "dcgan28", "kwargs": KW}},
        "generator": g.state_dict(),
        "critic": d.state_dict(),
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict(),
        "rng": {
            **{k: torch.get_rng_state() for k in ("torch", "data", "noise", "measure")},
            "python": [version, list(internal), gauss],
            "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])],
        },
        "extra": {"critic": None, "generator": None},
        "wall_s": 1.5,
    }
    exports = {
        "generator": Export(g, "dcgan28", dict(KW)),
        "critic": Export(d, "dcgan28", dict(CKW)),
    }
    return state, exports


def _new_run(path: Path, step: int = 3) -> tuple[RunFolder, dict, dict]:
    run = RunFolder(path).create({"method": "wgan-gp", "model": "dcgan28", "steps": 10})
    state, exports = _trainer_state(step)
    run.save_checkpoint(state, exports)
    run.close()
    return run, state, exports


def _flip(path: Path, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def _partials(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith((".part", ".tmp")))


# --------------------------------------------------------------------------- bit flips

#: bit positions as fractions of the file: header, pickle, tensor data, zip directory, end
FLIP_AT = (0.0005, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.9995)


def test_every_bit_flip_in_last_pt_is_refused_on_load(tmp_path):
    run, _, _ = _new_run(tmp_path / "r")
    good = run.last_checkpoint.read_bytes()
    nbits = 8 * len(good)
    for frac in FLIP_AT:
        run.last_checkpoint.write_bytes(good)
        _flip(run.last_checkpoint, int(frac * nbits))
        with pytest.raises(LipganError) as err:
            run.load_checkpoint()
        msg = str(err.value)
        assert "\n" not in msg and str(run.last_checkpoint) in msg, frac
        assert "checksum mismatch" in msg or "corrupt" in msg, msg
    run.last_checkpoint.write_bytes(good)
    assert run.load_checkpoint()["step"] == 3  # the untouched file still loads


@pytest.mark.parametrize("kind", ["generator", "critic"])
def test_every_bit_flip_in_an_export_is_refused_by_sample_eval_lipschitz(tmp_path, kind, capsys):
    run, _, _ = _new_run(tmp_path / "r")
    file = run.export_path(kind)
    good = file.read_bytes()
    nbits = 8 * len(good)
    for frac in FLIP_AT:
        file.write_bytes(good)
        _flip(file, int(frac * nbits))
        with pytest.raises(LipganError, match="checksum mismatch"):
            runs.load_network(run.path, kind)
    # Through the commands that read exports: one line, exit 2, nothing written.
    _flip(file, 8 * (len(good) - 64))
    cmds = [["lipschitz", str(run.path), "--which", kind, "--no-lower"]]
    if kind == "generator":
        cmds.append(["eval", str(run.path), "--n", "200"])
    for argv in cmds:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("lipgan: error:") and "checksum mismatch" in err and "\n" not in err
    assert not run.eval_path.exists()


def test_manifest_lists_checkpoint_and_exports_with_their_sha256(tmp_path):
    import hashlib

    run, _, _ = _new_run(tmp_path / "r")
    doc = json.loads((run.path / "manifest.json").read_text())
    assert doc["format"] == "lipgan-manifest"
    files = doc["files"]
    assert set(files) == {"checkpoints/last.pt", "generator.safetensors", "critic.safetensors"}
    for rel, entry in files.items():
        assert entry["sha256"] == hashlib.sha256((run.path / rel).read_bytes()).hexdigest()
        assert entry["also"] == []  # a first write replaced nothing
    ck = run.load_checkpoint()
    assert ck["exports"] == {k: files[k]["sha256"] for k in ck["exports"]}
    # A second save keeps the replaced version valid too (a kill before its rename loses
    # nothing), and only that one.
    state, exports = _trainer_state(step=4, seed=5)
    run.save_checkpoint(state, exports)
    again = json.loads((run.path / "manifest.json").read_text())["files"]
    for rel in files:
        assert again[rel]["also"] == [files[rel]["sha256"]] != [again[rel]["sha256"]]
    run.close()


def test_old_run_folder_without_manifest_still_loads(tmp_path):
    run, _, _ = _new_run(tmp_path / "r")
    (run.path / "manifest.json").unlink()
    assert run.load_checkpoint()["step"] == 3
    assert runs.load_network(run.path, "generator").z_dim == 16


# --------------------------------------------------------------------------- write order


_KILL_BETWEEN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_runfolder_integrity import _trainer_state
from lipgan.runs import RunFolder, files

real = files.atomic_write_bytes
def write(path, data, *args):
    if path.name == "last.pt":
        os.kill(os.getpid(), signal.SIGKILL)  # the exports are on disk, last.pt is not
    return real(path, data, *args)
files.atomic_write_bytes = write
state, exports = _trainer_state(step=4, seed=1)
RunFolder({path!r}).save_checkpoint(state, exports)
"""


def test_sigkill_between_exports_and_checkpoint_leaves_a_consistent_resumable_run(tmp_path):
    run, _, _ = _new_run(tmp_path / "r", step=3)
    code = _KILL_BETWEEN.format(tests=str(Path(__file__).parent), path=str(run.path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # The checkpoint is the old one, and it loads: no false checksum alarm.
    state = run.load_checkpoint()
    assert state["step"] == 3
    # The exports are newer than the checkpoint; resume is told to rewrite them, and it can,
    # because last.pt is not the final step (exports are written first, never after).
    newer, _ = _trainer_state(step=4, seed=1)
    got = runs.load_network(run.path, "generator").state_dict()
    assert all(torch.equal(got[k], newer["generator"][k]) for k in got)
    assert sorted(run.stale_exports(state)) == ["critic.safetensors", "generator.safetensors"]
    _, exports = _trainer_state(step=3)
    digests = run.write_exports(exports)  # what a resume does before training on
    assert run.stale_exports(state) == [] and set(digests) == set(state["exports"])
    assert _partials(run.path) == []
    run.close()


def test_kill_during_a_replace_keeps_both_versions_valid(tmp_path, monkeypatch):
    """Between the manifest's 'begin' and the rename, the old file must still verify."""
    run, _, _ = _new_run(tmp_path / "r", step=3)
    from lipgan.runs import files

    def crash(src, dst):
        raise KeyboardInterrupt  # as if killed right before the rename

    monkeypatch.setattr(files.os, "replace", crash)
    state, exports = _trainer_state(step=4, seed=2)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(state, exports)
    monkeypatch.undo()
    assert run.load_checkpoint()["step"] == 3
    runs.load_network(run.path, "critic")
    assert _partials(run.path) == []
    run.close()


# --------------------------------------------------------------------------- checkpoint structure


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("step", "abc", "'step'"),
        ("step", -5, "'step'"),
        ("lr_scale", "big", "'lr_scale'"),
        ("wall_s", "x", "'wall_s'"),
        ("extra", 5, "'extra'"),
        ("rng", None, "no 'rng'"),
        ("step", None, "no 'step'"),
    ],
)
def test_checkpoint_with_a_wrong_field_is_refused_before_anything_is_touched(
    tmp_path, field, value, says
):
    run, _, _ = _new_run(tmp_path / "r")
    state = run.load_checkpoint()
    if value is None:
        del state[field]
    else:
        state[field] = value
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(LipganError, match=says):
        runs.load_checkpoint(bad)
    with pytest.raises(LipganError, match=says):  # and never written either
        run.save_checkpoint(state, {})


def test_checkpoint_with_bad_rng_or_mixed_up_optimizer_is_refused(tmp_path):
    run, _, _ = _new_run(tmp_path / "r")
    state = run.load_checkpoint()
    for mutate, says in (
        (lambda s: s["rng"].__setitem__("torch", torch.zeros(3, dtype=torch.uint8)), "'rng'"),
        (lambda s: s["rng"].__setitem__("python", [3, [1, 2], None]), "'rng'"),
        (lambda s: s["rng"].__setitem__("numpy", ["MT19937", [1], 0, 0, 0.0]), "'rng'"),
        (lambda s: s.__setitem__("opt_d", s["opt_g"]), "'opt_d'"),
    ):
        bad = {**state, "rng": dict(state["rng"])}
        mutate(bad)
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(LipganError, match=says):
            runs.load_checkpoint(tmp_path / "bad.pt")


# --------------------------------------------------------------------------- one writer

_HOLD = """
import sys, time
from lipgan.runs import RunFolder
run = RunFolder({path!r}).lock()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    run, _, _ = _new_run(tmp_path / "r")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD.format(path=str(run.path))], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
        second = RunFolder(run.path)
        for write in (
            lambda: second.write_status("running", 3, 10, 1.0),
            lambda: second.write_config({"method": "sn"}),
            lambda: second.remove_partials(),
            lambda: second.lock(),
        ):
            with pytest.raises(LipganError, match=rf"being written by .*pid {holder.pid}"):
                write()
        after = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
        assert after == before
        assert second.load_checkpoint()["step"] == 3  # readers are never refused
    finally:
        holder.kill()
        holder.wait()
    # The holder died (SIGKILL): the kernel dropped its lock, so the folder is free again.
    second.write_status("running", 3, 10, 1.0)
    second.close()


def test_a_new_run_never_reuses_a_folder_that_holds_anything(tmp_path):
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("precious")
    with pytest.raises(LipganError, match="holds files that are not a lipgan run"):
        RunFolder(notes).create({"method": "wgan-gp"})
    assert sorted(p.name for p in notes.iterdir()) == ["notes.txt"]  # not even a lock file
    run, _, _ = _new_run(tmp_path / "r")
    with pytest.raises(LipganError, match="already holds a run"):
        RunFolder(run.path).create({"method": "sn"})
    assert run.read_config()["method"] == "wgan-gp"
    empty = tmp_path / "empty"
    empty.mkdir()
    RunFolder(empty).create({"method": "sn"}).close()  # an empty folder loses nothing


# --------------------------------------------------------------------------- OS errors


def test_a_file_where_a_folder_is_expected_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path in (afile, afile / "run"):
        with pytest.raises(LipganError, match="a file is where a folder is expected") as err:
            RunFolder(path).create({"method": "wgan-gp"})
        assert "\n" not in str(err.value) and str(afile) in str(err.value)
    run, _, _ = _new_run(tmp_path / "r")
    assert main(["report", str(run.path), "--out", str(afile / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a file is where a folder is expected" in err
    folder_out = tmp_path / "dir.html"
    folder_out.mkdir()
    assert main(["report", str(run.path), "--out", str(folder_out)]) == 2
    assert "a folder is where a file is expected" in capsys.readouterr().err
    assert afile.read_text() == "x"


@pytest.fixture
def mounted(tmp_path):
    """Mount helper: yields mount(kind, path); unmounts everything at the end (root only)."""
    done = []

    def mount(kind: str, path: Path, source: Path | None = None) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if kind == "tmpfs":
            cmd = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)]
        else:  # a read-only view of `source`
            cmd = ["mount", "--bind", "-o", "ro", str(source), str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a {kind} here ({proc.stderr.strip() or proc.returncode})")
        done.append(path)
        if kind == "ro":
            probe = path / f".probe-{uuid.uuid4().hex}"
            try:
                probe.write_text("x")
            except OSError:
                return path
            probe.unlink()
            pytest.skip("the bind mount is not read-only here")
        return path

    yield mount
    for path in reversed(done):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_folder_is_one_line_and_leaves_nothing(tmp_path, mounted, capsys):
    src = tmp_path / "src"
    src.mkdir()
    run, _, _ = _new_run(src / "r")
    ro = mounted("ro", tmp_path / "ro", source=src)
    before = sorted(p.name for p in (src / "r").rglob("*"))
    with pytest.raises(LipganError, match="Read-only file system"):
        RunFolder(ro / "new").create({"method": "wgan-gp"})
    with pytest.raises(LipganError, match="Read-only file system"):
        RunFolder(ro / "r").write_status("running", 3, 10, 1.0)
    assert RunFolder(ro / "r").load_checkpoint()["step"] == 3  # reading still works
    assert main(["report", str(ro / "r"), "--out", str(ro / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Read-only file system" in err
    assert main(["eval", str(ro / "r"), "--n", "200"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert sorted(p.name for p in (src / "r").rglob("*")) == before


def test_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, mounted, capsys):
    small = mounted("tmpfs", tmp_path / "full")
    run = RunFolder(small / "r").create({"method": "wgan-gp", "steps": 10})
    config = run.config_path.read_bytes()
    state, exports = _trainer_state()
    with pytest.raises(LipganError, match="No space left on device") as err:
        run.save_checkpoint(state, exports)  # ~ 300 kB into 64 kB
    assert "\n" not in str(err.value)
    assert _partials(small) == []
    assert run.config_path.read_bytes() == config
    assert not run.last_checkpoint.exists()
    run.close()
    # A report onto the full disk: one line, no .tmp or .part left, no page.
    src, _, _ = _new_run(tmp_path / "src")
    filler = small / "filler"
    with open(filler, "wb") as fh:  # fill what is left
        try:
            fh.write(bytes(1 << 20))
        except OSError:
            pass
    assert main(["report", str(src.path), "--out", str(small / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert _partials(small) == [] and not (small / "r.html").exists()


# --------------------------------------------------------------------------- huge sizes


def test_eval_refuses_huge_or_bad_sizes_before_any_work(tmp_path, capsys):
    run, _, _ = _new_run(tmp_path / "r")
    t0 = time.process_time()
    for argv, says in (
        (["--n", "2000000000"], "--n must be an integer from 128 to 200000"),
        (["--batch-size", "0"], "--batch-size must be an integer from 1"),
        (["--batch-size", "-5"], "--batch-size must be an integer from 1"),
        (["--batch-size", "100000000"], "--batch-size must be an integer from 1 to 65536"),
        (["--seed", "-1"], "--seed must be an integer from 0"),
        (["--seed", "99999999999999999999999"], "--seed must be an integer from 0"),
    ):
        assert main(["eval", str(run.path), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert time.process_time() - t0 < 10  # refused up front, nothing generated
    assert not run.eval_path.exists()
    np.save(tmp_path / "s.npy", np.zeros((200, 28, 28), np.uint8))
    assert main(["eval", "--samples", str(tmp_path / "s.npy"), "--n", "2000000000"]) == 2
    assert "--n must be an integer from 0 to 200000" in capsys.readouterr().err


def test_eval_json_has_one_writer_and_is_atomic(tmp_path, monkeypatch):
    from lipgan.metrics import sampling

    run, _, _ = _new_run(tmp_path / "r")
    writes = []
    real = RunFolder.write_eval

    def spy(self, result):
        writes.append(self.path)
        return real(self, result)

    monkeypatch.setattr(RunFolder, "write_eval", spy)
    fake = {k: 1.0 for k in ("fid", "kid", "is", "precision", "recall", "density", "coverage")}
    fake.update(classes_covered=10, class_kl=0.0, n=200)
    monkeypatch.setattr("lipgan.metrics.evaluate", lambda *a, **k: dict(fake))
    sampling.evaluate_run(run.path, n=200)
    assert writes == [run.path]
    assert json.loads(run.eval_path.read_text()) == {**fake, "generator": "raw"}  # no EMA file
    assert _partials(run.path) == []
    assert os.stat(run.eval_path).st_mode & 0o044  # readable by others (not mkstemp's 0600)


def test_oserror_messages_name_the_path_and_fit_on_one_line(tmp_path):
    err = runs.os_error(OSError(28, os.strerror(28), str(tmp_path / "x")))
    assert str(err).startswith(f"{tmp_path / 'x'}: No space left on device")
    assert "\n" not in str(err)
