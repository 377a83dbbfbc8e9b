"""Image grids and PNG files, written by lipgan itself (zlib + struct; no PIL, no torchvision).

A PNG is the 8-byte signature, then chunks ``length | type | data | CRC32(type + data)``:
``IHDR`` (width, height, bit depth 8, colour type 0 = grey or 2 = RGB), one ``IDAT`` holding the
zlib-compressed rows, each prefixed by its filter byte (0: none), and an empty ``IEND``.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from lipgan.errors import LipganError

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Map floats in ``value_range`` to 0..255: ``round(255 (x - lo) / (hi - lo))``, clamped.

    Shapes: ``(N, C, H, W)`` float tensor -> ``(N, C, H, W)`` uint8 array.
    """
    lo, hi = value_range
    if not hi > lo:
        raise LipganError(f"value_range {value_range} must be increasing")
    x = images.detach().to("cpu", torch.float32)
    x = ((x - lo) * (255.0 / (hi - lo))).round().clamp_(0, 255)
    return x.to(torch.uint8).numpy()


def make_grid(
    images: torch.Tensor | np.ndarray,
    nrow: int | None = None,
    padding: int = 2,
    pad_value: int = 0,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> np.ndarray:
    """Tile ``N`` images into rows of ``nrow`` (default ``ceil(sqrt(N))``) with ``padding`` pixels.

    Shapes: ``(N, C, H, W)`` (float in ``value_range``, or uint8) -> ``(rows*(H+p)+p,
    nrow*(W+p)+p)`` uint8 for C = 1, with a trailing 3 for C = 3.
    """
    if isinstance(images, torch.Tensor):
        arr = images.detach().cpu().numpy() if images.dtype == torch.uint8 else None
        if arr is None:
            arr = to_uint8(images, value_range)
    else:
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            arr = to_uint8(torch.from_numpy(arr.astype(np.float32)), value_range)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or arr.shape[0] == 0:
        raise LipganError(f"make_grid takes (N, 1|3, H, W) images, got shape {tuple(arr.shape)}")
    n, c, h, w = arr.shape
    ncol = int(nrow) if nrow else int(np.ceil(np.sqrt(n)))
    nrows = -(-n // ncol)
    p = int(padding)
    grid = np.full((c, nrows * (h + p) + p, ncol * (w + p) + p), pad_value, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = p + r * (h + p), p + k * (w + p)
        grid[:, y : y + h, x : x + w] = arr[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB array."""
    arr = np.ascontiguousarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise LipganError(
            f"encode_png takes uint8 (H, W) or (H, W, 3), got {arr.dtype} {arr.shape}"
        )
    h, w = arr.shape[:2]
    colour = 0 if arr.ndim == 2 else 2
    rows = arr.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (
        _SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


def write_png(path: str | Path, pixels: np.ndarray) -> Path:
    """Write ``pixels`` (see :func:`encode_png`) to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode_png(pixels)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_grid(
    path: str | Path,
    images: torch.Tensor,
    nrow: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """:func:`make_grid` then :func:`write_png`."""
    return write_png(path, make_grid(images, nrow=nrow, value_range=value_range))


def read_png(path: str | Path) -> np.ndarray:
    """Read an 8-bit grey or RGB, non-interlaced PNG (all five row filters) into a uint8 array."""
    data = Path(path).read_bytes()
    if not data.startswith(_SIGNATURE):
        raise LipganError(f"{path}: not a PNG file")
    pos, idat, header = 8, b"", None
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise LipganError(f"{path}: CRC mismatch in chunk {kind!r}")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise LipganError(f"{path}: PNG without IHDR")
    w, h, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in (0, 2) or interlace:
        raise LipganError(f"{path}: only 8-bit grey/RGB non-interlaced PNGs are supported")
    bpp = 1 if colour == 0 else 3
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), np.int32)
    prev = np.zeros(w * bpp, np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f in (0, 2):  # no filter / "up": no dependence along the row, so vectorized
            cur = line if f == 0 else (line + prev) & 0xFF
            out[y], prev = cur, cur
            continue
        cur = np.zeros(w * bpp, np.int32)
        for i in range(w * bpp):
            a = cur[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 0:
                pred = 0
            elif f == 1:
                pred = a
            elif f == 2:
                pred = b
            elif f == 3:
                pred = (a + b) // 2
            else:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[i] = (line[i] + pred) & 0xFF
        out[y], prev = cur, cur
    out = out.astype(np.uint8)
    return out if colour == 0 else out.reshape(h, w, 3)
