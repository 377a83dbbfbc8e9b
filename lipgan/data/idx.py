"""IDX files (the MNIST layout), raw or gzip: validated reading, and one split of a folder."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch

from lipgan.data.catalog import FILENAMES
from lipgan.errors import LipganError

_CHUNK = 1 << 20
_IDX_TYPES = {0x08: np.uint8}


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
