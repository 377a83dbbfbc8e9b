"""MNIST, Fashion-MNIST and any folder of IDX files: fetching with verification, reading, batches.

Images are kept as one uint8 tensor ``(N, 1, 28, 28)`` per split; batches are drawn by random
index from an explicit :class:`torch.Generator` and scaled to floats on the fly, so there are no
DataLoader workers and no per-sample Python.

Modules: :mod:`lipgan.data.catalog` (the named datasets, their checksums, the cache folder),
:mod:`lipgan.data.idx` (reading IDX files), :mod:`lipgan.data.fetching` (verified fetches),
:mod:`lipgan.data.batches` (:class:`BatchSource`); this module loads a dataset into memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lipgan.data.batches import BatchSource
from lipgan.data.catalog import (
    DATASETS,
    FASHION_MNIST,
    FILENAMES,
    MNIST,
    ROLES,
    DatasetSpec,
    FileSpec,
    _spec,
    cache_root,
)
from lipgan.data.fetching import (
    FetchReport,
    _recorded_source,
    download,
    fetch,
    remove_stale_parts,
    verify_file,
)
from lipgan.data.idx import load_split, read_idx
from lipgan.errors import LipganError

__all__ = [
    "DATASETS",
    "FASHION_MNIST",
    "FILENAMES",
    "MNIST",
    "ROLES",
    "BatchSource",
    "Dataset",
    "DatasetSpec",
    "FetchReport",
    "FileSpec",
    "cache_root",
    "download",
    "fetch",
    "info",
    "load",
    "load_split",
    "read_idx",
    "remove_stale_parts",
    "verify_file",
]


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
