"""Scoring sample sets from outside lipgan: PNG reading, arrays with range detection, the CLI."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch

from lipgan import metrics
from lipgan.cli import main
from lipgan.errors import LipganError
from lipgan.metrics import samples_io

needs_mnist = pytest.mark.skipif(
    not metrics.available("mnist"), reason="the MNIST extractor is not installed"
)


def _png(path, img: np.ndarray, color: int, filters: list[int], interlace: int = 0, depth=8):
    """Encode ``img`` (H, W, C) uint8 with the given per-row filter types (independent encoder)."""
    h, w = img.shape[:2]
    bpp = img.shape[2]
    flat = img.reshape(h, w * bpp).astype(np.int64)
    rows = []
    for y in range(h):
        cur = flat[y]
        up = flat[y - 1] if y else np.zeros_like(cur)
        left = np.concatenate([np.zeros(bpp, np.int64), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), up[:-bpp]])
        ft = filters[y % len(filters)]
        if ft == 0:
            pred = np.zeros_like(cur)
        elif ft == 1:
            pred = left
        elif ft == 2:
            pred = up
        elif ft == 3:
            pred = (left + up) // 2
        else:
            p = left + up - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        rows.append(bytes([ft]) + ((cur - pred) % 256).astype(np.uint8).tobytes())

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, interlace)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )
    path.write_bytes(data)


@pytest.mark.parametrize("filters", [[0], [1], [2], [3], [4], [0, 1, 2, 3, 4]])
def test_png_filters_grayscale(tmp_path, filters):
    img = np.random.default_rng(1).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    _png(tmp_path / "a.png", img, 0, filters)
    np.testing.assert_array_equal(samples_io.read_png(tmp_path / "a.png"), img[..., 0])


@pytest.mark.parametrize(("color", "channels"), [(2, 3), (4, 2), (6, 4)])
def test_png_color_and_alpha(tmp_path, color, channels):
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    img = np.repeat(gray[..., None], channels, axis=2)
    if channels in (2, 4):
        img[..., -1] = 255  # opaque: compositing over black keeps the gray level
    _png(tmp_path / "a.png", img, color, [4, 3, 1])
    np.testing.assert_array_equal(samples_io.read_png(tmp_path / "a.png"), gray)
    if channels in (2, 4):
        img[..., -1] = 0  # fully transparent over black is black
        _png(tmp_path / "b.png", img, color, [0])
        assert samples_io.read_png(tmp_path / "b.png").max() == 0


def test_png_written_by_pillow(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    img = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
    pil.fromarray(img, mode="L").save(tmp_path / "l.png")
    pil.fromarray(np.stack([img] * 3, -1), mode="RGB").save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(samples_io.read_png(tmp_path / "l.png"), img)
    np.testing.assert_array_equal(samples_io.read_png(tmp_path / "rgb.png"), img)


def test_png_round_trip_with_own_writer(tmp_path):
    img = np.random.default_rng(4).integers(0, 256, (28, 28), dtype=np.uint8)
    samples_io.write_png(tmp_path / "a.png", img)
    np.testing.assert_array_equal(samples_io.read_png(tmp_path / "a.png"), img)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(depth=16), "bit depth 16"),
        # rows written without Adam7 passes under an interlace flag: Pillow finds them short
        (dict(interlace=1), "corrupt PNG"),
    ],
)
def test_png_unsupported_forms(tmp_path, kw, message):
    img = np.zeros((28, 28, 1), np.uint8)
    _png(tmp_path / "a.png", img, 0, [0], **kw)
    with pytest.raises(LipganError, match=message):
        samples_io.read_png(tmp_path / "a.png")


def test_png_garbage_and_wrong_size(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png at all")
    with pytest.raises(LipganError, match="not a PNG"):
        samples_io.read_png(tmp_path / "x.png")
    d = tmp_path / "dir"
    d.mkdir()
    samples_io.write_png(d / "a.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(LipganError, match="expected 28x28"):
        samples_io.load_samples(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LipganError, match="no .png files"):
        samples_io.load_samples(empty)


# --------------------------------------------------------------------------- arrays


def test_range_detection(tmp_path):
    rng = np.random.default_rng(5)
    u8 = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    want = torch.from_numpy(u8.astype(np.float32) / 255.0 * 2 - 1).unsqueeze(1)
    cases = {
        "u8.npy": (u8, "uint8 0..255"),
        "unit.npy": (u8.astype(np.float32) / 255.0, "floats in [0, 1]"),
        "tanh.npy": (u8.astype(np.float64) / 127.5 - 1.0, "floats in [-1, 1]"),
        "int.npy": (u8.astype(np.int64), "integers 0..255"),
        "chw.npy": (u8[:, None], "uint8"),
        "hwc.npy": (u8[..., None], "uint8"),
    }
    for name, (arr, said) in cases.items():
        np.save(tmp_path / name, arr)
        x, msg = samples_io.load_samples(tmp_path / name)
        assert said in msg, (name, msg)
        torch.testing.assert_close(x, want, atol=1e-6, rtol=0)
    np.savez(tmp_path / "s.npz", labels=np.zeros(5), samples=u8)
    x, _ = samples_io.load_samples(tmp_path / "s.npz")
    torch.testing.assert_close(x, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("arr", "message"),
    [
        (np.zeros((5, 32, 32), np.uint8), "shape"),
        (np.zeros((0, 28, 28), np.uint8), "empty"),
        (np.full((5, 28, 28), np.nan), "NaN"),
        (np.full((5, 28, 28), 3.5), "values span"),
        (np.zeros((5, 28, 28), bool), "dtype"),
    ],
)
def test_bad_arrays(tmp_path, arr, message):
    np.save(tmp_path / "a.npy", arr)
    with pytest.raises(LipganError, match=message):
        samples_io.load_samples(tmp_path / "a.npy")


def test_ambiguous_npz_and_unknown_files(tmp_path):
    np.savez(tmp_path / "a.npz", a=np.zeros((5, 28, 28)), b=np.zeros((5, 28, 28)))
    with pytest.raises(LipganError, match="name the array"):
        samples_io.load_samples(tmp_path / "a.npz")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(LipganError, match="unsupported file type"):
        samples_io.load_samples(tmp_path / "a.txt")
    with pytest.raises(LipganError, match="no such"):
        samples_io.load_samples(tmp_path / "missing.npy")


# --------------------------------------------------------------------------- CLI


@needs_mnist
def test_cli_eval_samples_json_matches_library(tmp_path, mnist, capsys):
    x = mnist.test_images[:200, 0].numpy()  # few: KID costs subsets x n^2
    np.save(tmp_path / "s.npy", x)
    assert main(["eval", "--samples", str(tmp_path / "s.npy"), "--json"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert list(res) == list(metrics.EVAL_KEYS)
    assert "uint8 0..255" in out.err
    lib = metrics.evaluate(samples_io.load_samples(tmp_path / "s.npy")[0], "mnist")
    assert res == pytest.approx(lib, rel=1e-12)
    # uint8 given to the library directly: the same up to float32 rounding of the scaling.
    direct = metrics.evaluate(mnist.test_images[:200], "mnist", kid_subsets=5)
    assert res["fid"] == pytest.approx(direct["fid"], rel=1e-4)


@needs_mnist
def test_cli_eval_png_folder_table(tmp_path, mnist, capsys):
    for i in range(130):
        samples_io.write_png(tmp_path / f"{i:04d}.png", mnist.test_images[i, 0].numpy())
    assert main(["eval", "--samples", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "classes covered" in out and "precision" in out


def test_cli_eval_errors(tmp_path, capsys):
    np.save(tmp_path / "few.npy", np.zeros((10, 28, 28), np.uint8))
    assert main(["eval", "--samples", str(tmp_path / "few.npy")]) == 2
    assert "fewer than the feature dimension" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "exactly one" in capsys.readouterr().err


class _TinyGenerator(torch.nn.Module):
    """A generator of test-set digits: z picks an image, so the scores are those of real data."""

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.z_dim = 8
        self.register_buffer("images", images.float() / 127.5 - 1.0)
        self.calls = 0

    def forward(self, z):
        self.calls += 1
        idx = (z[:, 0].abs() * 1e4).long() % self.images.shape[0]
        return self.images[idx]


@needs_mnist
def test_cli_eval_run_writes_eval_json(tmp_path, mnist, monkeypatch, capsys):
    gen = _TinyGenerator(mnist.test_images[:2000])
    seen = {}

    def load_network(path, which="critic"):
        seen["args"] = (path, which)
        return gen

    from lipgan.metrics import sampling

    monkeypatch.setattr(sampling, "load_network", load_network)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("dataset: mnist\nmethod: wgan-gp\n")
    assert main(["eval", str(run), "--n", "200"]) == 0
    assert seen["args"] == (run, "generator")
    assert gen.calls == 1  # 200 samples in one batch of 500
    res = json.loads((run / "eval.json").read_text())
    assert list(res) == [*metrics.EVAL_KEYS, "generator"] and res["n"] == 200
    assert res["generator"] == "raw"  # the folder keeps no moving average
    assert res["classes_covered"] == 10 and res["is"] > 8
    assert "FID" in capsys.readouterr().out


@needs_mnist
def test_cli_eval_run_with_real_run_folder(tmp_path, capsys):
    runs = pytest.importorskip("lipgan.runs")
    from lipgan import models

    kwargs = {"width": 4, "z_dim": 16}
    torch.manual_seed(0)
    gen = models.build("generator", "dcgan28", **kwargs)
    run = tmp_path / "run"
    run.mkdir()
    runs.export_network(gen, run / "generator.safetensors", "generator", "dcgan28", kwargs)
    assert main(["eval", str(run), "--n", "160", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "eval.json").read_text())
    assert printed == saved and saved["n"] == 160
    # The same samples scored by the library directly.
    from lipgan.metrics.sampling import generate

    x = generate(runs.load_network(run, "generator"), 160, seed=0)
    assert saved.pop("generator") == "raw"
    assert saved == pytest.approx(metrics.evaluate(x, "mnist"), rel=1e-12)
    # With a moving average beside it, eval scores the average and says so; --raw the iterate.
    torch.manual_seed(1)
    ema = models.build("generator", "dcgan28", **kwargs)
    runs.export_network(ema, run / "generator_ema.safetensors", "generator", "dcgan28", kwargs)
    assert main(["eval", str(run), "--n", "160", "--json"]) == 0
    out = capsys.readouterr()
    saved = json.loads((run / "eval.json").read_text())
    assert "EMA generator" in out.err and json.loads(out.out) == saved
    assert saved.pop("generator") == "ema"
    x = generate(runs.load_network(run / "generator_ema.safetensors", "generator"), 160, seed=0)
    assert saved == pytest.approx(metrics.evaluate(x, "mnist"), rel=1e-12)
    assert main(["eval", str(run), "--n", "160", "--raw"]) == 0
    out = capsys.readouterr()
    assert "EMA" not in out.err and "generator" in out.out and " raw " in out.out
    assert json.loads((run / "eval.json").read_text())["generator"] == "raw"
    file = run / "generator_ema.safetensors"
    assert main(["eval", str(file), "--n", "160", "--raw"]) == 2  # a file is not a run folder
    assert "give the run folder" in capsys.readouterr().err


def test_broken_sample_files_are_one_line_errors(tmp_path):
    """Red-team finding 14: each of these was a traceback (or read /dev/zero forever)."""
    (tmp_path / "notzip.npz").write_bytes(b"this is not a zip file at all")
    (tmp_path / "badhdr.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4', (((")
    (tmp_path / "short.png").write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 2) + b"IHDR\0\0")
    (tmp_path / "dir.png").mkdir()
    zero = tmp_path / "zero.npy"
    zero.symlink_to("/dev/zero")
    for name, says in (
        ("notzip.npz", "cannot read array|not a readable"),
        ("badhdr.npy", "cannot read array|not a readable"),
        ("zero.npy", "not a regular file"),
    ):
        with pytest.raises(LipganError, match=says) as err:
            samples_io.load_samples(tmp_path / name)
        assert "\n" not in str(err.value)
    for name, says in (("short.png", "corrupt PNG"), ("dir.png", "not a regular file")):
        with pytest.raises(LipganError, match=says):
            samples_io.read_png(tmp_path / name)
    png = tmp_path / "pngs"
    png.mkdir()
    (png / "a.png").symlink_to("/dev/zero")
    with pytest.raises(LipganError, match="not a regular file"):
        samples_io.load_samples(png)
