"""Reading sample sets made by any generator: .npy / .npz arrays and folders of PNG files.

The PNG reader is a small one of our own (zlib + struct, PNG specification, W3C 2003): 8-bit
grayscale, gray+alpha, RGB and RGBA, non-interlaced. Color is reduced to luma (ITU-R BT.601
weights) and alpha is composited over black, MNIST's background.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from lipgan.errors import LipganError

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # color type -> samples per pixel
_MAX_FILES = 1_000_000


def read_png(path: str | Path) -> np.ndarray:
    """A PNG file as a uint8 array ``(H, W)`` of gray levels."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:8] != _PNG_SIG:
        raise LipganError(f"{path}: not a PNG file")
    pos, header, idat = 8, None, []
    while pos + 8 <= len(raw):
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        ctype = raw[pos + 4 : pos + 8]
        body = raw[pos + 8 : pos + 8 + length]
        if len(body) < length:
            raise LipganError(f"{path}: truncated PNG chunk {ctype!r}")
        if ctype == b"IHDR":
            header = struct.unpack(">IIBBBBB", body[:13])
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
        pos += 12 + length  # length, type, body, CRC
    if header is None or not idat:
        raise LipganError(f"{path}: PNG without IHDR or IDAT chunk")
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in _CHANNELS or interlace != 0:
        raise LipganError(
            f"{path}: PNG with bit depth {depth}, color type {color}, interlace {interlace} is not "
            "supported; save 8-bit grayscale, RGB or RGBA without interlacing"
        )
    ch = _CHANNELS[color]
    try:
        data = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise LipganError(f"{path}: corrupt PNG image data ({exc})") from None
    stride = width * ch
    if len(data) != height * (stride + 1):
        raise LipganError(f"{path}: PNG image data has the wrong size for {width}x{height}")
    img = _unfilter(data, height, stride, ch, path)
    pix = img.reshape(height, width, ch).astype(np.float64)
    if ch in (2, 4):  # composite over black
        pix = pix[..., :-1] * (pix[..., -1:] / 255.0)
    if pix.shape[-1] == 3:
        gray = pix @ np.array([0.299, 0.587, 0.114])
    else:
        gray = pix[..., 0]
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def _unfilter(data: bytes, height: int, stride: int, bpp: int, path: Path) -> np.ndarray:
    """Undo the per-row PNG filters (0 none, 1 sub, 2 up, 3 average, 4 Paeth)."""
    out = np.zeros((height, stride), dtype=np.uint8)
    prior = np.zeros(stride, dtype=np.int64)
    for y in range(height):
        ftype = data[y * (stride + 1)]
        row = np.frombuffer(data, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        if ftype == 0:
            cur = row
        elif ftype == 1:
            # Sub is a running sum per channel: vectorize it along each channel.
            cur = row.copy()
            for c in range(bpp):
                cur[c::bpp] = np.cumsum(row[c::bpp]) & 0xFF
        elif ftype == 2:
            cur = (row + prior) & 0xFF
        elif ftype in (3, 4):
            r, b = row.tolist(), prior.tolist()
            cur_l = [0] * stride
            for i in range(stride):
                a = cur_l[i - bpp] if i >= bpp else 0
                if ftype == 3:
                    cur_l[i] = (r[i] + ((a + b[i]) >> 1)) & 0xFF
                else:
                    c = b[i - bpp] if i >= bpp else 0
                    p = a + b[i] - c
                    pa, pb, pc = abs(p - a), abs(p - b[i]), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b[i] if pb <= pc else c)
                    cur_l[i] = (r[i] + pred) & 0xFF
            cur = np.array(cur_l, dtype=np.int64)
        else:
            raise LipganError(f"{path}: unknown PNG filter type {ftype} in row {y}")
        out[y] = cur
        prior = cur
    return out


def write_png(path: str | Path, img: np.ndarray) -> None:
    """Write a uint8 ``(H, W)`` gray image as PNG (filter 0); used by tests and examples."""
    img = np.asarray(img, dtype=np.uint8)
    h, w = img.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    rows = b"".join(b"\x00" + img[y].tobytes() for y in range(h))
    Path(path).write_bytes(
        _PNG_SIG
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def load_samples(path: str | Path) -> tuple[torch.Tensor, str]:
    """Load images from an .npy/.npz file or a folder of .png files, scaled to [-1, 1].

    Returns float32 ``(N, 1, 28, 28)`` and a sentence saying which input range was detected:
    uint8 (or integral floats up to 255) as 0..255, floats within [0, 1] as [0, 1], floats
    within [-1, 1] with negatives as [-1, 1].
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise LipganError(f"{path}: no .png files in this folder")
        if len(files) > _MAX_FILES:
            raise LipganError(f"{path}: {len(files)} PNG files; at most {_MAX_FILES} are read")
        imgs = [read_png(f) for f in files]
        for f, im in zip(files, imgs):
            if im.shape != (28, 28):
                raise LipganError(f"{f}: image is {im.shape[1]}x{im.shape[0]}, expected 28x28")
        arr = np.stack(imgs)
    elif path.is_file():
        arr = _load_array(path)
    else:
        raise LipganError(f"{path}: no such file or folder")
    return _to_unit_range(arr, path)


def _load_array(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                for k in ("samples", "images", "x", "arr_0"):
                    if k in keys:
                        return z[k]
                if len(keys) == 1:
                    return z[keys[0]]
                raise LipganError(
                    f"{path}: .npz holds {', '.join(keys) or 'nothing'}; name the array "
                    "'samples' or store only one"
                )
    except (OSError, ValueError) as exc:
        raise LipganError(f"{path}: cannot read array ({exc})") from None
    raise LipganError(f"{path}: unsupported file type; use .npy, .npz or a folder of .png files")


def _to_unit_range(arr: np.ndarray, path: Path) -> tuple[torch.Tensor, str]:
    """Scale ``arr`` to [-1, 1] float32 ``(N, 1, 28, 28)``, detecting its range."""
    if arr.ndim == 4 and arr.shape[-1] == 1 and arr.shape[1:3] == (28, 28):
        arr = arr[..., 0]  # (N, 28, 28, 1), channels last
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1:] != (1, 28, 28):
        raise LipganError(
            f"{path}: array has shape {arr.shape}; expected (N, 28, 28), (N, 1, 28, 28) or "
            "(N, 28, 28, 1) grayscale images"
        )
    if arr.shape[0] == 0:
        raise LipganError(f"{path}: the sample set is empty")
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0
        said = "uint8 0..255"
    elif np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer):
        a = arr.astype(np.float64)
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).reshape(a.shape[0], -1).any(1).sum())
            raise LipganError(f"{path}: {bad} of {a.shape[0]} images contain NaN or inf values")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            x, said = a, "floats in [0, 1]"
        elif lo >= -1.0 and hi <= 1.0:
            x, said = (a + 1.0) / 2.0, "floats in [-1, 1]"
        elif lo >= 0.0 and hi <= 255.0 and np.all(a == np.rint(a)):
            x, said = a / 255.0, "integers 0..255"
        else:
            raise LipganError(
                f"{path}: values span [{lo:.4g}, {hi:.4g}]; expected uint8 0..255 or floats in "
                "[0, 1] or [-1, 1]"
            )
    else:
        raise LipganError(f"{path}: array dtype {arr.dtype} is not an image type")
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) * 2.0 - 1.0
    return t, f"{arr.shape[0]} images read from {path} as {said}"
