"""Reference features and statistics of the real train and test sets, cached on disk.

Files live in ``lipgan.data.cache_root()/stats/`` and are named by dataset, split and the first 16
hex digits of the extractor's SHA-256 (and the features' version), so retrained weights never
meet stale statistics. Each
file is written to a temporary name and renamed, so a crash or a concurrent writer never leaves a
half-written cache behind.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lipgan.errors import LipganError
from lipgan.metrics import extractor as ex
from lipgan.metrics import scores
from lipgan.runs.files import atomic_write_bytes


@dataclass
class Reference:
    """One split of a dataset seen through an extractor.

    ``mu`` ``(D,)`` and ``sigma`` ``(D, D)`` in float64 over the whole split; ``features``
    ``(N, D)`` float32 (kept for the test split only, for KID and the k-NN scores);
    ``class_counts`` ``(10,)`` from the labels; ``radii``: the features' squared 3-NN and 5-NN
    distances (test split), which precision/recall and density/coverage reuse at N = 10000.
    """

    dataset: str
    split: str
    sha256: str
    mu: np.ndarray
    sigma: np.ndarray
    class_counts: np.ndarray
    features: np.ndarray | None
    radii: tuple[np.ndarray, np.ndarray] | None = None  # squared 3-NN, 5-NN radii of features


_MEMO: dict[tuple[str, str, str], Reference] = {}
_COUNTS: dict[str, np.ndarray] = {}


def class_counts(dataset: str, split: str = "train") -> np.ndarray:
    """Label counts ``(10,)`` of a split: the data's class distribution."""
    key = f"{dataset}/{split}"
    if key not in _COUNTS:
        from lipgan import data

        _, labels = data.load(dataset).split(split)
        _COUNTS[key] = np.bincount(labels.numpy(), minlength=10)
    return _COUNTS[key]


def stats_dir() -> Path:
    from lipgan.data import cache_root

    return Path(cache_root()) / "stats"


def cache_file(dataset: str, split: str, sha256: str) -> Path:
    return stats_dir() / f"{dataset}-{split}-{sha256[:16]}-f{ex.FEATURES_VERSION}.npz"


def get(dataset: str, split: str = "test") -> Reference:
    """The reference of ``dataset``/``split`` for the shipped extractor: memo, disk or computed."""
    net, sha = ex.load(dataset)
    key = (dataset, split, sha)
    if key in _MEMO:
        return _MEMO[key]
    path = cache_file(dataset, split, sha)
    ref = _read(path, dataset, split, sha)
    if ref is None:
        ref = _compute(net, dataset, split, sha)
        _write(path, ref)
    _MEMO[key] = ref
    return ref


def _compute(net: ex.Extractor, dataset: str, split: str, sha: str) -> Reference:
    from lipgan import data

    ds = data.load(dataset)
    images, labels = ds.split(split)
    feats, _ = ex.features_and_probs(net, images)
    mu, sigma = scores.mean_cov(feats)
    counts = np.bincount(labels.numpy(), minlength=10)
    if split != "test":
        return Reference(dataset, split, sha, mu, sigma, counts, None)
    keep = feats.to(torch.float32).numpy()
    # Radii of the float32 features as stored, so cached and fresh runs agree exactly.
    r3, r5 = scores.real_radii_of(torch.from_numpy(keep), 3, 5)
    return Reference(dataset, split, sha, mu, sigma, counts, keep, (r3.numpy(), r5.numpy()))


def _read(path: Path, dataset: str, split: str, sha: str) -> Reference | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["sha256"]) != sha:
                return None
            feats = z["features"] if z["features"].size else None
            radii = (z["radii3"], z["radii5"]) if z["radii3"].size else None
            return Reference(
                dataset, split, sha, z["mu"], z["sigma"], z["class_counts"], feats, radii
            )
    except (OSError, KeyError, ValueError):
        return None  # missing or unreadable: recompute and overwrite


def _write(path: Path, ref: Reference) -> None:
    """Cache ``ref`` at ``path`` (atomically). A cache that cannot be written (read-only, full)
    costs a recomputation next time, not this evaluation: it is said once on stderr."""
    buf = io.BytesIO()
    np.savez(
        buf,
        sha256=np.array(ref.sha256),
        mu=ref.mu,
        sigma=ref.sigma,
        class_counts=ref.class_counts,
        features=ref.features if ref.features is not None else np.zeros((0,), np.float32),
        radii3=ref.radii[0] if ref.radii is not None else np.zeros((0,)),
        radii5=ref.radii[1] if ref.radii is not None else np.zeros((0,)),
    )
    try:
        atomic_write_bytes(path, buf.getvalue())
    except LipganError as exc:
        print(f"lipgan: not caching the reference statistics: {exc}", file=sys.stderr)
