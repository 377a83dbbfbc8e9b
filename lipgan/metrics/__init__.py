"""Sample quality for MNIST and Fashion-MNIST with shipped domain feature extractors.

``fid(samples)``, ``evaluate(samples)`` and ``available(dataset)`` are the API the trainer and
``compare`` use. Samples are float tensors ``(N, 1, 28, 28)`` in [-1, 1], as the generators make
them (uint8 0..255 is accepted too). The features are the 128-unit penultimate layer of a small
CNN classifier trained on the dataset (:mod:`lipgan.metrics.extractor`); the real statistics come
from :mod:`lipgan.metrics.reference` (cached per dataset and extractor hash).

Numbers are comparable only for the same extractor and the same number of samples: FID is biased
in N, so compare at a fixed N (``docs/metrics.md`` gives the ladder of reference values).
"""

from __future__ import annotations

import numpy as np
import torch

from lipgan.errors import LipganError
from lipgan.metrics import extractor as _ex
from lipgan.metrics import reference as _ref
from lipgan.metrics import scores
from lipgan.metrics.extractor import FEATURE_DIM

__all__ = [
    "FEATURE_DIM",
    "EVAL_KEYS",
    "available",
    "as_images",
    "features",
    "fid",
    "evaluate",
    "ladder",
    "ladder_sets",
    "gaussian_blur",
    "scores",
]

EVAL_KEYS = (
    "fid",
    "kid",
    "is",
    "precision",
    "recall",
    "density",
    "coverage",
    "classes_covered",
    "class_kl",
    "n",
)


def available(dataset: str) -> bool:
    """True when the shipped extractor for ``dataset`` exists."""
    return _ex.available(dataset)


def as_images(samples, n: int | None = None, min_n: int = 1) -> torch.Tensor:
    """Validate ``samples`` and return the first ``n`` as float32 ``(n, 1, 28, 28)``.

    Accepts tensors or arrays ``(N, 1, 28, 28)`` or ``(N, 28, 28)``; uint8 is mapped from 0..255
    to [-1, 1], floats are taken as [-1, 1]. Raises :class:`LipganError` for other shapes, an
    empty set, NaN/inf, ``n`` larger than the set, or fewer than ``min_n`` samples.
    """
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(np.ascontiguousarray(samples))
    if not isinstance(samples, torch.Tensor):
        raise LipganError(f"samples must be a tensor or array, got {type(samples).__name__}")
    x = samples.detach().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise LipganError(
            f"samples have shape {tuple(samples.shape)}; expected (N, 1, 28, 28) or (N, 28, 28) "
            "grayscale 28x28 images"
        )
    if x.shape[0] == 0:
        raise LipganError("the sample set is empty; pass at least one image")
    if n is not None:
        if n < 1:
            raise LipganError(f"n must be positive, got {n}")
        if n > x.shape[0]:
            raise LipganError(f"asked for n={n} samples but only {x.shape[0]} were given")
        x = x[:n]
    if x.dtype == torch.uint8:
        x = x.float() * (2.0 / 255.0) - 1.0
    elif x.is_floating_point():
        x = x.float()
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
            raise LipganError(f"{bad} of {x.shape[0]} samples contain NaN or inf values")
    else:
        raise LipganError(f"samples have dtype {x.dtype}; use float in [-1, 1] or uint8 0..255")
    if x.shape[0] < min_n:
        raise LipganError(
            f"{x.shape[0]} samples are fewer than the feature dimension {min_n}: the feature "
            f"covariance would be singular; use at least {min_n} (10000 to compare with the docs)"
        )
    return x


def features(samples, dataset: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, 128)`` and class probabilities ``(N, 10)`` (float64) of ``samples``."""
    net, _ = _ex.load(dataset)
    return _ex.features_and_probs(net, as_images(samples))


def fid(samples, dataset: str = "mnist", split: str = "test", n: int | None = None) -> float:
    """FID of ``samples`` ``(N, 1, 28, 28)`` in [-1, 1] against the real ``split`` of ``dataset``.

    FID = ‖μ_s − μ_r‖² + tr(Σ_s + Σ_r − 2(Σ_s^½ Σ_r Σ_s^½)^½) on the extractor's features; the
    real statistics are cached. Uses the first ``n`` samples when given. Needs N >= 128.
    """
    net, _ = _ex.load(dataset)
    x = as_images(samples, n=n, min_n=FEATURE_DIM)
    ref = _ref.get(dataset, split)
    f, _ = _ex.features_and_probs(net, x)
    mu, sigma = scores.mean_cov(f)
    return scores.frechet_distance(mu, sigma, ref.mu, ref.sigma)


def evaluate(
    samples,
    dataset: str = "mnist",
    n: int | None = None,
    details: bool = False,
    seed: int = 0,
    kid_subsets: int = 100,
) -> dict:
    """Every score of ``samples`` ``(N, 1, 28, 28)`` in [-1, 1] against the real test set.

    Returns the keys of ``eval.json``: fid (vs the test statistics); kid (mean unbiased MMD² over
    ``kid_subsets`` subsets of min(1000, N)); is (Inception-style score with the domain
    classifier); precision and recall (k = 3), density and coverage (k = 5) against min(N, 10000)
    real test images drawn with ``seed``; class_kl (KL of the predicted classes to the training
    labels' shares); classes_covered; n. ``details=True`` adds kid_std, class_histogram,
    dataset, extractor_sha256 and n_real.
    """
    net, sha = _ex.load(dataset)
    x = as_images(samples, n=n, min_n=FEATURE_DIM)
    test = _ref.get(dataset, "test")
    counts = _ref.class_counts(dataset, "train")
    f, p = _ex.features_and_probs(net, x)
    mu, sigma = scores.mean_cov(f)
    real = torch.from_numpy(test.features).double()
    radii = test.radii
    if real.shape[0] > f.shape[0]:
        # k-NN scores depend on the set sizes: compare equal numbers of real and fake.
        idx = np.random.default_rng(seed).choice(real.shape[0], f.shape[0], replace=False)
        real, radii = real[np.sort(idx)], None
    kid_mean, kid_std = scores.kid(
        f, torch.from_numpy(test.features), n_subsets=kid_subsets, seed=seed
    )
    hist = scores.class_histogram(p)
    out = {
        "fid": scores.frechet_distance(mu, sigma, test.mu, test.sigma),
        "kid": kid_mean,
        "is": scores.inception_score(p),
        **scores.prdc(real, f, real_radii=radii),
        "classes_covered": scores.classes_covered(hist, counts),
        "class_kl": scores.class_kl(hist, counts),
        "n": int(x.shape[0]),
    }
    out = {k: out[k] for k in EVAL_KEYS}
    if details:
        out.update(
            kid_std=kid_std,
            class_histogram=[int(c) for c in hist],
            dataset=dataset,
            extractor_sha256=sha,
            n_real=int(real.shape[0]),
        )
    return out


def ladder_sets(dataset: str = "mnist", n: int = 10000, seed: int = 0):
    """Yield ``(name, images)`` of the ladder: ``n`` training images (the floor), the test set,
    the test set with Gaussian pixel noise σ = 0.1, 0.25, 0.5 (on [0, 1] pixels, clipped), and
    the test set blurred by a Gaussian of σ = 1 and 2 pixels. Images are ``(N, 1, 28, 28)`` in
    [-1, 1] (uint8 for the two real sets).
    """
    from lipgan import data

    ds = data.load(dataset)
    gen = torch.Generator().manual_seed(seed)
    train_idx = torch.randperm(ds.train_images.shape[0], generator=gen)[:n]
    yield f"train-{n} vs test", ds.train_images[train_idx]
    yield "test vs test", ds.test_images
    test = ds.test_images.float() / 255.0
    for s in (0.1, 0.25, 0.5):
        yield f"noise {s}", (test + s * torch.randn(test.shape, generator=gen)).clamp(0, 1) * 2 - 1
    for s in (1.0, 2.0):
        yield f"blur {s}", gaussian_blur(test, s) * 2 - 1


def ladder(dataset: str = "mnist", n: int = 10000, seed: int = 0, full: bool = False) -> dict:
    """Reference values that make numbers readable: FID (or, with ``full``, every score of
    :func:`evaluate`) of each set of :func:`ladder_sets` against the real test set.
    """
    out = {}
    for name, x in ladder_sets(dataset, n, seed):
        out[name] = evaluate(x, dataset, details=True, seed=seed) if full else fid(x, dataset)
    return out


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, 1, H, W)`` images, kernel radius ceil(3σ), zero padded."""
    r = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r))
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1), padding=(r, 0))
