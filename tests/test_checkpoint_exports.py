"""A second network of one kind (the generator's moving average) exported beside the first:
RUN/generator_ema.safetensors is named in last.pt and the manifest like generator.safetensors,
checked on every load, and rewritten on resume when stale."""

from __future__ import annotations

import pytest
import torch

from lipgan import models
from lipgan.errors import LipganError
from lipgan.runs import Export, RunFolder
from lipgan.runs.checkpoint import export_kind

KW = {"width": 4, "z_dim": 16}


def _exports(seed: int = 0) -> dict[str, Export]:
    torch.manual_seed(seed)
    g = models.build("generator", "dcgan28", **KW)
    ema = models.build("generator", "dcgan28", **KW)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)  # not the raw generator: a mix-up of the two files shows
    return {
        "generator": Export(g, "dcgan28", dict(KW)),
        "generator_ema": Export(ema, "dcgan28", dict(KW)),
        "critic": Export(models.build("critic", "dcgan28", width=4), "dcgan28", {"width": 4}),
    }


def _run(tmp_path, exports):
    run = RunFolder(tmp_path / "r").create({"method": "wgan-gp", "model": "dcgan28"})
    state = {"step": 3, "generator": exports["generator"].module.state_dict()}
    run.save_checkpoint(state, exports)
    run.close()
    return run


def test_the_ema_export_is_named_in_last_pt_and_loads_as_a_generator(tmp_path):
    exports = _exports()
    run = _run(tmp_path, exports)
    state = run.load_checkpoint()
    assert set(state["exports"]) == {
        "generator.safetensors", "generator_ema.safetensors", "critic.safetensors",
    }  # fmt: skip
    assert "generator_ema.safetensors" in run.manifest.read()
    assert run.stale_exports(state) == []
    net = run.load_export("generator_ema")
    want = exports["generator_ema"].module.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
    raw = exports["generator"].module.state_dict()
    assert not all(torch.equal(v, raw[k]) for k, v in net.state_dict().items())


def test_a_changed_or_stale_ema_export_is_caught(tmp_path):
    run = _run(tmp_path, _exports())
    file = run.path / "generator_ema.safetensors"
    good = file.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 1
    file.write_bytes(bytes(data))
    with pytest.raises(LipganError, match="checksum mismatch") as err:
        run.load_export("generator_ema")
    assert "\n" not in str(err.value)
    # a kill between the exports and last.pt: resume sees the EMA file is not the named one
    assert run.stale_exports(run.load_checkpoint()) == ["generator_ema.safetensors"]
    file.write_bytes(good)
    assert run.stale_exports(run.load_checkpoint()) == []


def test_export_names():
    assert export_kind("generator") == "generator"
    assert export_kind("generator_ema") == "generator"
    for bad in ("ema", "generator_", "weights_ema"):
        with pytest.raises(LipganError, match="export name"):
            export_kind(bad)
