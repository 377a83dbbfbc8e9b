"""Reading sample sets made by any generator: .npy / .npz arrays and folders of PNG files.

PNGs are decoded by Pillow through :func:`lipgan.image.read_png` (any 8-bit grey, grey+alpha,
RGB, RGBA or palette PNG, interlaced or not). Color is reduced to luma (ITU-R BT.601 weights)
and alpha is composited over black, MNIST's background.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from lipgan import image
from lipgan.errors import LipganError
from lipgan.runs.files import os_error, regular_file

_MAX_FILES = 1_000_000
#: the largest .npy/.npz read: 10^6 float32 28x28 images are about 3 GB
_MAX_ARRAY_BYTES = 4 << 30


def read_png(path: str | Path) -> np.ndarray:
    """A PNG file as a uint8 array ``(H, W)`` of gray levels."""
    return image.read_png(path, gray=True)


def write_png(path: str | Path, img: np.ndarray) -> None:
    """Write a uint8 ``(H, W)`` gray image as PNG; used by tests and examples."""
    image.write_png(path, np.asarray(img, dtype=np.uint8))


def load_samples(path: str | Path) -> tuple[torch.Tensor, str]:
    """Load images from an .npy/.npz file or a folder of .png files, scaled to [-1, 1].

    Returns float32 ``(N, 1, 28, 28)`` and a sentence saying which input range was detected:
    uint8 (or integral floats up to 255) as 0..255, floats within [0, 1] as [0, 1], floats
    within [-1, 1] with negatives as [-1, 1].
    """
    path = Path(path)
    if path.is_dir():
        try:
            files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        except OSError as exc:
            raise os_error(exc, path) from None
        if not files:
            raise LipganError(f"{path}: no .png files in this folder")
        if len(files) > _MAX_FILES:
            raise LipganError(f"{path}: {len(files)} PNG files; at most {_MAX_FILES} are read")
        imgs = [read_png(f) for f in files]
        for f, im in zip(files, imgs):
            if im.shape != (28, 28):
                raise LipganError(f"{f}: image is {im.shape[1]}x{im.shape[0]}, expected 28x28")
        arr = np.stack(imgs)
    elif path.exists():  # a device or pipe too: _load_array refuses it by name
        arr = _load_array(path)
    else:
        raise LipganError(f"{path}: no such file or folder")
    return _to_unit_range(arr, path)


def _load_array(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise LipganError(
            f"{path}: unsupported file type; use .npy, .npz or a folder of .png files"
        )
    regular_file(path, _MAX_ARRAY_BYTES, "an .npy or .npz file")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
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
    except LipganError:
        raise
    except OSError as exc:
        if exc.errno is not None:
            raise os_error(exc, path) from None
        raise LipganError(f"{path}: cannot read array ({exc})") from None
    except (ValueError, zipfile.BadZipFile, EOFError, SyntaxError, MemoryError) as exc:
        # numpy's header parser raises tokenize/SyntaxError for a malformed header
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LipganError(f"{path}: cannot read array ({first[:160]})") from None
    except Exception as exc:  # e.g. tokenize.TokenError from numpy's header parser
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LipganError(f"{path}: not a readable .npy/.npz file ({first[:160]})") from None


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
