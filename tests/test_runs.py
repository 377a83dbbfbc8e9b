"""Run folders: checkpoints (atomic, weights_only, clear refusals), safetensors export, CSVs."""

import csv
import json
import os
import pickle

import pytest
import torch

from lipgan import constraints as C
from lipgan import models, runs
from lipgan.errors import LipganError


def _snapshot(folder):
    """Every file under ``folder`` with its bytes: 'unchanged' means equal snapshots."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def test_checkpoint_roundtrip_weights_only(tmp_path):
    net = models.build("critic", "dcgan28", width=4)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    state = {
        "step": 7,
        "critic": net.state_dict(),
        "opt": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "py": [3, [1, 2, 3], None],
    }
    path = runs.save_checkpoint(tmp_path / "c" / "last.pt", state)
    assert sorted(os.listdir(path.parent)) == ["last.pt"]  # no temporary file left
    # A plain torch.load with weights_only=True reads it (the contract for other tools).
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == runs.CHECKPOINT_FORMAT and raw["step"] == 7
    back = runs.load_checkpoint(path)
    for k, v in net.state_dict().items():
        assert torch.equal(back["critic"][k], v)
    assert torch.equal(back["rng"], state["rng"])


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = runs.save_checkpoint(tmp_path / "last.pt", {"w": torch.randn(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LipganError, match="truncated or corrupt"):
        runs.load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(LipganError, match="truncated or corrupt"):
        runs.load_checkpoint(path)


class _Evil:
    """Unpickling this would create a file (a stand-in for arbitrary code)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    # Both the legacy pickle format and torch's zip format.
    for writer in ("pickle", "torch"):
        if writer == "pickle":
            path.write_bytes(pickle.dumps({"format": runs.CHECKPOINT_FORMAT, "x": _Evil(target)}))
        else:
            torch.save({"format": runs.CHECKPOINT_FORMAT, "x": _Evil(str(target))}, path)
        assert not target.exists()
        with pytest.raises(LipganError, match="nothing from it was executed"):
            runs.load_checkpoint(path)
        assert not target.exists()


def test_foreign_files_are_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(LipganError, match="not a lipgan checkpoint"):
        runs.load_checkpoint(path)
    with pytest.raises(LipganError, match="no such checkpoint"):
        runs.load_checkpoint(tmp_path / "missing.pt")


def test_export_folds_spectral_norm_and_reloads(tmp_path):
    torch.manual_seed(0)
    critic = C.get("spectral-norm").attach(models.build("critic", "dcgan28", width=4))
    x = torch.randn(3, 1, 28, 28)
    critic.train()
    for _ in range(3):  # move the power iteration along
        critic(x)
    critic.eval()
    want = critic(x)
    path = runs.export_network(
        critic, tmp_path / "critic.safetensors", "critic", "dcgan28", {"width": 4}
    )
    net = runs.load_network(path)
    assert type(net).__name__ == "Critic" and not net.training
    torch.testing.assert_close(net(x), want)
    # The exported weight is W / sigma: its reshaped top singular value is ~1.
    w = net[0].weight.detach().reshape(4, -1)
    assert abs(torch.linalg.matrix_norm(w, ord=2).item() - 1.0) < 0.05
    # The source module still works (folding must not strip its parametrization).
    critic.train()
    critic(x)
    # Metadata is what the contract says.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["lipgan_kind"] == "critic" and meta["lipgan_model"] == "dcgan28"
    assert json.loads(meta["lipgan_kwargs"]) == {"width": 4}


def test_load_network_from_run_folder_and_errors(tmp_path):
    g = models.build("generator", "dcgan28", width=4)
    runs.export_network(
        g, tmp_path / "generator.safetensors", "generator", "dcgan28", {"width": 4, "z_dim": 128}
    )
    net = runs.load_network(tmp_path, "generator")
    z = torch.randn(2, 128)
    torch.testing.assert_close(net(z), g.eval()(z))
    with pytest.raises(LipganError, match="no critic.safetensors"):
        runs.load_network(tmp_path, "critic")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(LipganError, match="no lipgan metadata"):
        runs.load_network(tmp_path / "plain.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(LipganError):
        runs.load_network(tmp_path / "bad.safetensors")


def test_metrics_csv_columns_and_truncation(tmp_path):
    run = runs.Run(tmp_path / "r").create({"method": "x"})
    for s in (10, 20, 30):
        run.log_metrics({"step": s, "wasserstein": s / 10, "loss_d": -s / 10})
    run.log_layer_norms(20, [("0", 1.5, 1.0), ("2", 2.0, None)])
    run.close_logs()
    with open(run.metrics_path, "a") as fh:
        fh.write("40,1.0,0.5")  # a torn row, as a kill mid-write leaves
    with open(run.metrics_path) as fh:
        header = next(csv.reader(fh))
    assert header == [
        "step", "time_s", "cpu_s", "wasserstein", "loss_d", "loss_g", "penalty",
        "gnorm_real_mean", "gnorm_real_max", "gnorm_fake_mean", "gnorm_fake_max",
        "gnorm_interp_mean", "gnorm_interp_max", "product_bound", "fid", "fid_mark_s",
        "ms_per_step",
    ]  # fmt: skip
    run.truncate_logs(20)
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[1]["wasserstein"] == 2.0 and rows[1]["loss_g"] is None
    with open(run.layer_norms_path) as fh:
        lrows = list(csv.reader(fh))
    assert lrows == [["step", "layer", "operator_norm", "reshaped_norm"],
                     ["20", "0", "1.5", "1.0"], ["20", "2", "2.0", ""]]  # fmt: skip
    with pytest.raises(ValueError):
        run.log_metrics({"bogus": 1})


def _old_log(path, header, rows):
    """A CSV log as an older lipgan wrote it: its own header, then rows (a torn last one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
        fh.write(",".join(rows[0][:2]))  # torn: fewer cells than the header


def test_an_older_metrics_csv_keeps_its_rows_on_resume(tmp_path):
    """A log whose header lacks today's columns (they were added later) and holds one that is
    gone: resume maps its rows by its own header instead of dropping them all as torn."""
    from lipgan.schema import METRIC_COLUMNS

    old = ["step", "time_s", "lr", "wasserstein"]  # no loss_d ... ms_per_step; lr retired
    rows = [[str(s), str(s / 10), "0.001", str(-s)] for s in (1, 2, 3, 4)]
    run = runs.RunFolder(tmp_path / "r")
    _old_log(run.metrics_path, old, rows)
    run.truncate_logs(3)
    got = run.read_metrics()
    assert [r["step"] for r in got] == [1, 2, 3]
    assert [r["wasserstein"] for r in got] == [-1, -2, -3] and got[0]["time_s"] == 0.1
    assert got[0]["lr"] == 0.001 and got[0]["loss_d"] is None
    run.log_metrics({"step": 4, "wasserstein": -4.5, "fid": 9.5})
    run.close()
    got = run.read_metrics()
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert got[3]["fid"] == 9.5 and got[3]["wasserstein"] == -4.5 and got[3]["lr"] is None
    with open(run.metrics_path) as fh:
        assert next(csv.reader(fh)) == [*METRIC_COLUMNS, "lr"]


def test_an_older_log_opened_for_appending_gets_todays_columns(tmp_path):
    """No truncate_logs first (a writer that only appends): the first row logged rewrites the
    old header, keeping the rows; a header torn by a kill leaves no empty column behind."""
    run = runs.RunFolder(tmp_path / "r")
    _old_log(run.layer_norms_path, ["step", "layer", "operator_norm"], [["5", "0", "1.5"]])
    run.log_layer_norms(6, [("0", 1.25, 0.5)])
    run.close()
    with open(run.layer_norms_path) as fh:
        assert list(csv.reader(fh)) == [
            ["step", "layer", "operator_norm", "reshaped_norm"],
            ["5", "0", "1.5", ""],
            ["6", "0", "1.25", "0.5"],
        ]
    torn = runs.RunFolder(tmp_path / "t")
    torn.path.mkdir()
    torn.metrics_path.write_text("step,time_s,wass")  # killed while writing its header
    torn.log_metrics({"step": 1, "wasserstein": 0.5})
    torn.close()
    assert [r["wasserstein"] for r in torn.read_metrics()] == [0.5]
    assert "wass" not in torn.read_metrics()[0]


def test_status_extra_keys_follow_the_core_ones(tmp_path):
    run = runs.RunFolder(tmp_path / "r")
    extra = {"cpu_s": 12.5, "step": 99, "measure": {"share": 0.04}}
    run.write_status("running", 3, 5, 1.25, extra=extra)
    status = run.read_status()
    assert list(status)[:5] == ["state", "reason", "step", "steps", "wall_s"]
    assert status["step"] == 3  # a core key is never replaced
    assert status["cpu_s"] == 12.5 and status["measure"] == {"share": 0.04}


def test_run_folder_basics(tmp_path):
    run = runs.Run(tmp_path / "r").create({"method": "wgan-gp", "steps": 5})
    assert run.read_config() == {"method": "wgan-gp", "steps": 5}
    with pytest.raises(LipganError, match="already holds a run"):
        runs.Run(tmp_path / "r").create({})
    run.write_status("running", 3, 5, 1.25)
    assert run.read_status() == {
        "state": "running", "reason": None, "step": 3, "steps": 5, "wall_s": 1.25
    }  # fmt: skip
    path = run.save_samples(3, torch.zeros(4, 1, 28, 28))
    assert path.name == "step_000003.png" and (run.samples_dir / "last.png").is_file()
    (run.checkpoints_dir).mkdir()
    (run.checkpoints_dir / ".last.pt.abc.part").write_bytes(b"x")
    run.remove_partials()
    assert list(run.checkpoints_dir.iterdir()) == []
    before = _snapshot(run.path)
    with pytest.raises(LipganError):
        runs.Run(tmp_path / "nothing").read_config()
    assert _snapshot(run.path) == before


def _export_with(path, state, meta):
    from safetensors.torch import save_file

    save_file(state, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (dict(meta={"lipgan_kwargs": "{not json"}), "lipgan_kwargs is not JSON"),
        (dict(meta={"lipgan_kwargs": "[1, 2]"}), "must be a JSON object"),
        (dict(meta={"lipgan_kwargs": '{"width": 10000000}'}), "weights do not fit"),
        (dict(dtype=torch.int8), "is torch.int8"),
        (dict(nan=True), "holds NaN or inf"),
    ],
)
def test_bad_export_metadata_or_tensors_are_one_line_errors(tmp_path, change, says):
    """Red-team finding 10: each gave a traceback, or was sampled/evaluated silently."""
    gen = models.build("generator", "dcgan28", width=4)
    state = {k: v.contiguous() for k, v in gen.state_dict().items()}
    if "dtype" in change:
        state = {k: (v * 0).to(change["dtype"]) if v.is_floating_point() else v
                 for k, v in state.items()}  # fmt: skip
    if change.get("nan"):
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = state[key].clone().fill_(float("nan"))
    meta = {"lipgan_kind": "generator", "lipgan_model": "dcgan28", "lipgan_kwargs": '{"width": 4}'}
    meta.update(change.get("meta", {}))
    path = _export_with(tmp_path / "g.safetensors", state, meta)
    with pytest.raises(LipganError, match=says) as err:
        runs.load_network(path, "generator")
    assert "\n" not in str(err.value)


def test_exports_of_equal_networks_are_byte_equal(tmp_path):
    """safetensors writes its metadata from a hash map; lipgan sorts the header."""
    gen = models.build("generator", "dcgan28", width=4)
    kw = {"width": 4, "z_dim": gen.z_dim}
    a = runs.export_network(gen, tmp_path / "a.safetensors", "generator", "dcgan28", kw)
    blobs = {runs.export_bytes(gen, "generator", "dcgan28", kw) for _ in range(5)}
    assert blobs == {a.read_bytes()}
