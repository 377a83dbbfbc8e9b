"""Image grids and PNG files (encoded and decoded by Pillow, which comes with matplotlib).

``make_grid`` tiles generator output into one uint8 picture; ``encode_png``/``write_png`` write
it (atomically, through :func:`lipgan.runs.atomic_write_bytes`); ``read_png`` reads any 8-bit
PNG Pillow reads (grey, grey+alpha, RGB, RGBA, palette, interlaced) with bounded size, and every
bad file is one ``LipganError`` line.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lipgan.errors import LipganError
from lipgan.runs.files import atomic_write_bytes, os_error, regular_file

#: the largest PNG file read (bytes) and the most pixels decoded: a sample grid is far smaller,
#: and a crafted header cannot make us allocate gigabytes
MAX_PNG_BYTES = 64 << 20
MAX_PNG_PIXELS = 1 << 24
#: the 8-bit Pillow modes a PNG may decode to (16-bit ones are "I;16", "I", ...)
_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")


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


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB array."""
    arr = np.ascontiguousarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise LipganError(
            f"encode_png takes uint8 (H, W) or (H, W, 3), got {arr.dtype} {arr.shape}"
        )
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB").save(
        buf, format="PNG", compress_level=6
    )
    return buf.getvalue()


def write_png(path: str | Path, pixels: np.ndarray) -> Path:
    """Write ``pixels`` (see :func:`encode_png`) to ``path`` atomically (temp file + rename)."""
    return atomic_write_bytes(path, encode_png(pixels))


def save_grid(
    path: str | Path,
    images: torch.Tensor,
    nrow: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """:func:`make_grid` then :func:`write_png`."""
    return write_png(path, make_grid(images, nrow=nrow, value_range=value_range))


def _open_png(path: Path) -> Image.Image:
    regular_file(path, MAX_PNG_BYTES, "a PNG")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise os_error(exc, path) from None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise LipganError(f"{path}: not a PNG file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=["PNG"])
            w, h = im.size
            if w * h > MAX_PNG_PIXELS:
                raise LipganError(
                    f"{path}: a {w}x{h} PNG; at most {MAX_PNG_PIXELS} pixels are decoded"
                )
            if im.mode not in _MODES:
                raise LipganError(
                    f"{path}: PNG with bit depth 16 (Pillow mode {im.mode}) is not supported; "
                    "save 8-bit grayscale, RGB or RGBA"
                )
            im.load()  # decodes, and checks the chunk CRCs and the zlib stream
    except LipganError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LipganError(f"{path}: corrupt PNG ({first[:160]})") from None
    return im


def read_png(path: str | Path, *, gray: bool = False) -> np.ndarray:
    """A PNG file as uint8: ``(H, W)`` for grey, else ``(H, W, 3)`` RGB; with ``gray``, always
    ``(H, W)`` luma (ITU-R BT.601 weights ``0.299 R + 0.587 G + 0.114 B``). Alpha is
    composited over black (MNIST's background); palettes are expanded; 16-bit images are
    refused."""
    path = Path(path)
    im = _open_png(path)
    if im.mode in ("1", "P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
    pix = np.asarray(im, dtype=np.float64)
    if pix.ndim == 2:
        pix = pix[..., None]
    if im.mode in ("LA", "RGBA"):  # composite over black
        pix = pix[..., :-1] * (pix[..., -1:] / 255.0)
    if pix.shape[-1] == 3 and gray:
        pix = pix @ np.array([0.299, 0.587, 0.114])
    elif pix.shape[-1] == 1:
        pix = pix[..., 0]
    return np.clip(np.rint(pix), 0, 255).astype(np.uint8)
