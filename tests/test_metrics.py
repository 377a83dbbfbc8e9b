"""lipgan.metrics: shipped extractors, FID/KID against independent computations, the ladder,
IS, precision/recall/density/coverage, class coverage, input validation, caching, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from lipgan import metrics
from lipgan.errors import LipganError
from lipgan.metrics import extractor as ex
from lipgan.metrics import reference, scores

pytestmark = pytest.mark.skipif(
    not metrics.available("mnist"), reason="the MNIST extractor is not installed"
)


@pytest.fixture(scope="session")
def mnist_feats(mnist):
    """Features and probabilities of the whole MNIST test set and of 5k training images."""
    net, _ = ex.load("mnist")
    # The test features come from the reference cache; probabilities follow from them.
    f_test = torch.from_numpy(reference.get("mnist", "test").features).double()
    with torch.no_grad():
        p_test = torch.softmax(net.logits(f_test.float()).double(), dim=1)
    idx = torch.randperm(60000, generator=torch.Generator().manual_seed(1))[:5000]
    f_train, _ = ex.features_and_probs(net, mnist.train_images[idx])
    return {"test": f_test, "p_test": p_test, "train5k": f_train}


# --------------------------------------------------------------------------- shipped weights


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_shipped_weights_hash_and_size(name):
    if not metrics.available(name):
        pytest.skip(f"{name} extractor not installed")
    rec = ex.record(name)
    path = ex.weights_path(name)
    assert ex.sha256_file(path) == rec["sha256"]
    assert path.stat().st_size < 2_000_000
    assert rec["feature_dim"] == metrics.FEATURE_DIM
    assert rec["test_accuracy"] >= {"mnist": 0.993, "fashion-mnist": 0.92}[name]
    assert rec["command"].startswith(f"lipgan metrics train-extractor {name} --seed ")


def test_tampered_weights_are_refused(tmp_path, monkeypatch):
    bad = tmp_path / "mnist.safetensors"
    bad.write_bytes(ex.weights_path("mnist").read_bytes()[:-1] + b"\x00")
    (tmp_path / "mnist.json").write_text(ex.record_path("mnist").read_text())
    monkeypatch.setattr(ex, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(ex, "_CACHE", {})
    with pytest.raises(LipganError, match="SHA-256"):
        ex.load("mnist")


def test_training_is_deterministic_with_its_seed():
    kw = dict(epochs=1, max_batches=2, measure=False, log=lambda s: None)
    a, _ = ex.train("mnist", seed=3, **kw)
    b, _ = ex.train("mnist", seed=3, **kw)
    c, _ = ex.train("mnist", seed=4, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# --------------------------------------------------------------------------- FID


def _fid_scipy(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID written the textbook way, with scipy's general matrix square root."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(covmean)))


def test_fid_agrees_with_scipy_sqrtm(mnist_feats):
    f1 = mnist_feats["test"][:5000].numpy()
    f2 = mnist_feats["train5k"].numpy()
    ours = scores.frechet_distance(*scores.mean_cov(f1), *scores.mean_cov(f2))
    assert ours == pytest.approx(_fid_scipy(f1, f2), rel=1e-6)
    # A distribution far from the data: 1000 features of a shifted, rescaled set.
    f3 = f1[:1000] * 1.7 + 0.3
    ours = scores.frechet_distance(*scores.mean_cov(f3), *scores.mean_cov(f2))
    assert ours == pytest.approx(_fid_scipy(f3, f2), rel=1e-6)


def test_pipeline_features_are_the_reference_features(mnist):
    # What makes the FID of the test set against itself zero (checked whole in the slow test):
    # the features of test images through metrics.features are the cached reference features.
    f, _ = metrics.features(mnist.test_images[:1000], "mnist")
    ref = torch.from_numpy(reference.get("mnist", "test").features[:1000])
    assert torch.allclose(f.float(), ref.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_fid_of_test_set_against_itself_is_zero(mnist):
    assert 0.0 <= metrics.fid(mnist.test_images, "mnist") <= 1e-6


def test_fid_rises_along_the_noise_and_blur_ladders(mnist, mnist_feats):
    n = 1000  # FID is biased in N: every rung uses the same N
    x = mnist.test_images[:n].float() / 255.0
    gen = torch.Generator().manual_seed(0)
    noise = [
        metrics.fid((x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1) * 2 - 1)
        for s in (0.0, 0.1, 0.25, 0.5)
    ]
    assert all(a < b for a, b in zip(noise, noise[1:])), noise
    blur = [noise[0]] + [metrics.fid(metrics.gaussian_blur(x, s) * 2 - 1) for s in (1.0, 2.0)]
    assert all(a < b for a, b in zip(blur, blur[1:])), blur
    # The floor: real training images against the test statistics, far below the first rung.
    test = reference.get("mnist", "test")
    floor = scores.frechet_distance(
        *scores.mean_cov(mnist_feats["train5k"][:n]), test.mu, test.sigma
    )
    assert floor < 0.5 * noise[1], (floor, noise)


# --------------------------------------------------------------------------- KID


def _mmd2_loop(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with a direct double loop over pairs (independent of scores.py)."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return sxx + syy - 2 * sxy


def test_kid_agrees_with_a_direct_loop(mnist_feats):
    x = mnist_feats["test"][:40].numpy()
    y = mnist_feats["train5k"][:40].numpy() * 1.1
    direct = _mmd2_loop(x, y)
    assert scores.mmd2_unbiased(x, y) == pytest.approx(direct, rel=1e-6)
    # With subsets as large as the sets, every subset is the whole set (MMD² ignores order).
    mean, _ = scores.kid(torch.from_numpy(x), torch.from_numpy(y), n_subsets=3, subset_size=40)
    assert mean == pytest.approx(direct, rel=1e-6)
    # Different sizes.
    y2 = mnist_feats["train5k"][100:125].numpy()
    assert scores.mmd2_unbiased(x, y2) == pytest.approx(_mmd2_loop(x, y2), rel=1e-6)


def test_kid_is_not_clamped(mnist_feats):
    # Two disjoint halves of the test set: same distribution, so the unbiased estimate straddles
    # 0; find subsets where it is negative and check it is reported as such.
    f = mnist_feats["test"].numpy()
    negatives = 0
    for s in range(20):
        a, b = f[s * 50 : s * 50 + 25], f[s * 50 + 25 : s * 50 + 50]
        direct = _mmd2_loop(a, b) if s < 2 else scores.mmd2_unbiased(a, b)
        if direct < 0:
            negatives += 1
            mean, _ = scores.kid(torch.from_numpy(a), torch.from_numpy(b), 2, 25)
            assert mean == pytest.approx(direct, rel=1e-9) and mean < 0
    assert negatives > 0


# --------------------------------------------------------------------------- IS, PRDC, classes


def test_inception_score_of_mnist_test_set(mnist_feats):
    assert scores.inception_score(mnist_feats["p_test"]) >= 9.5


def test_inception_score_bounds():
    assert scores.inception_score(torch.eye(10)) == pytest.approx(10.0)
    assert scores.inception_score(torch.full((7, 10), 0.1)) == pytest.approx(1.0)
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert scores.inception_score(p) == pytest.approx(2.0)


def _prdc_brute(real: torch.Tensor, fake: torch.Tensor, k_pr=3, k_dc=5) -> dict:
    d_rr = torch.cdist(real, real)
    d_ff = torch.cdist(fake, fake)
    d_rf = torch.cdist(real, fake)
    rr_sorted = d_rr.sort(1).values
    r3, r5 = rr_sorted[:, k_pr], rr_sorted[:, k_dc]
    f3 = d_ff.sort(1).values[:, k_pr]
    precision = np.mean([bool((d_rf[:, j] <= r3).any()) for j in range(fake.shape[0])])
    recall = np.mean([bool((d_rf[i] <= f3).any()) for i in range(real.shape[0])])
    density = sum(int((d_rf[:, j] <= r5).sum()) for j in range(fake.shape[0])) / (
        k_dc * fake.shape[0]
    )
    coverage = np.mean([bool(d_rf[i].min() <= r5[i]) for i in range(real.shape[0])])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def test_prdc_matches_brute_force_with_small_chunks():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(90, 6, generator=gen, dtype=torch.float64)
    fake = torch.randn(70, 6, generator=gen, dtype=torch.float64) * 1.3 + 0.4
    ours = scores.prdc(real, fake, chunk=16)
    brute = _prdc_brute(real, fake)
    for key in brute:
        assert ours[key] == pytest.approx(brute[key], abs=1e-12), key
    # Cached real radii (as evaluate uses them at N = 10000) give the same scores.
    assert scores.prdc(real, fake, real_radii=scores.real_radii_of(real, 3, 5)) == ours


def test_precision_recall_of_test_against_train(mnist_feats):
    res = scores.prdc(mnist_feats["train5k"], mnist_feats["test"][:5000])
    assert res["precision"] >= 0.6 and res["recall"] >= 0.6
    # Identical distributions still give precision and recall below 1 and density near 1.
    assert res["precision"] < 1 and res["recall"] < 1
    assert 0.8 < res["density"] < 1.2


def test_single_digit_collapses_recall_and_coverage(mnist):
    ones = mnist.test_images[mnist.test_labels == 1][:1000]
    mixed = mnist.test_images[:1000]
    one = metrics.evaluate(ones, "mnist", kid_subsets=10)
    ref = metrics.evaluate(mixed, "mnist", kid_subsets=10)
    assert ref["classes_covered"] == 10 and one["classes_covered"] == 1
    assert one["recall"] < 0.25 * ref["recall"]
    assert one["coverage"] < 0.25 * ref["coverage"]
    counts = np.bincount(mnist.train_labels.numpy(), minlength=10)
    # All-"1" samples: KL(q || p) = log(1 / p_1), up to the few images classified elsewhere.
    assert one["class_kl"] == pytest.approx(math.log(counts.sum() / counts[1]), rel=0.02)
    assert ref["class_kl"] < 0.01
    assert one["fid"] > 10 * ref["fid"]


def test_class_kl_and_coverage_by_hand():
    counts = np.array([10, 30, 60])
    assert scores.class_kl(np.array([1, 3, 6]), counts) == pytest.approx(0.0, abs=1e-15)
    assert scores.class_kl(np.array([0, 0, 5]), counts) == pytest.approx(math.log(1 / 0.6))
    assert scores.classes_covered(np.array([0, 1, 99]), counts) == 1
    assert scores.classes_covered(np.array([2, 5, 93]), counts) == 3


def test_evaluate_keys_and_ranges(mnist):
    res = metrics.evaluate(mnist.test_images[:500], "mnist", details=True, kid_subsets=5)
    assert list(res)[:10] == list(metrics.EVAL_KEYS)
    assert res["n"] == 500 and res["n_real"] == 500
    assert sum(res["class_histogram"]) == 500
    for key in ("precision", "recall", "coverage"):
        assert 0.0 <= res[key] <= 1.0
    assert 1.0 <= res["is"] <= 10.0


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (torch.zeros(200, 3, 28, 28), "shape"),
        (torch.zeros(200, 1, 32, 32), "shape"),
        (torch.zeros(200, 784), "shape"),
        (torch.zeros(0, 1, 28, 28), "empty"),
        (torch.full((200, 1, 28, 28), float("nan")), "NaN"),
        (torch.zeros(100, 1, 28, 28), "fewer than the feature dimension"),
        (torch.zeros(200, 1, 28, 28, dtype=torch.int32), "dtype"),
        ([[0.0]], "tensor or array"),
    ],
)
def test_bad_samples_get_clear_errors(samples, message):
    with pytest.raises(LipganError, match=message):
        metrics.fid(samples)
    with pytest.raises(LipganError, match=message):
        metrics.evaluate(samples)


def test_n_larger_than_the_set_is_an_error(mnist):
    with pytest.raises(LipganError, match="only 200"):
        metrics.fid(mnist.test_images[:200], n=300)


def test_unknown_dataset():
    assert not metrics.available("cifar10")
    with pytest.raises(LipganError, match="no feature extractor"):
        metrics.fid(torch.zeros(200, 1, 28, 28), dataset="cifar10")


def test_uint8_and_float_inputs_agree(mnist):
    x = mnist.test_images[:300]
    # float32 rounding of the two scalings differs by about 1e-7 per pixel.
    assert metrics.fid(x) == pytest.approx(metrics.fid(x.float() / 127.5 - 1.0), rel=1e-4)


# --------------------------------------------------------------------------- caching


def test_reference_cache_is_written_atomically_and_reused(tmp_path, monkeypatch):
    calls = []

    def fake_compute(net, dataset, split, sha):
        calls.append(split)
        f = np.random.default_rng(0).normal(size=(300, 4))
        mu, sigma = scores.mean_cov(f)
        return reference.Reference(
            dataset, split, sha, mu, sigma, np.arange(10), f.astype(np.float32)
        )

    monkeypatch.setattr(reference, "stats_dir", lambda: tmp_path)
    monkeypatch.setattr(reference, "_MEMO", {})
    monkeypatch.setattr(reference, "_compute", fake_compute)
    first = reference.get("mnist", "test")
    sha = ex.record("mnist")["sha256"]
    # One file named by dataset, split, weights hash and features version; no temporary leftovers.
    assert [f.name for f in tmp_path.iterdir()] == [
        f"mnist-test-{sha[:16]}-f{ex.FEATURES_VERSION}.npz"
    ]
    monkeypatch.setattr(reference, "_MEMO", {})
    second = reference.get("mnist", "test")
    assert calls == ["test"]  # read back from disk, not recomputed
    np.testing.assert_array_equal(first.mu, second.mu)
    np.testing.assert_array_equal(first.sigma, second.sigma)
    np.testing.assert_array_equal(first.features, second.features)
    # A corrupt file is recomputed and replaced.
    next(tmp_path.iterdir()).write_bytes(b"garbage")
    monkeypatch.setattr(reference, "_MEMO", {})
    reference.get("mnist", "test")
    assert calls == ["test", "test"]


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_shipped_weights_accuracy(name):
    from lipgan import data

    if not metrics.available(name):
        pytest.skip(f"{name} extractor not installed")
    ds = data.load(name)
    net, _ = ex.load(name)
    acc = ex.accuracy(net, ds.test_images, ds.test_labels)
    assert acc >= {"mnist": 0.993, "fashion-mnist": 0.92}[name]
    assert acc == pytest.approx(ex.record(name)["test_accuracy"], abs=2e-4)


@pytest.mark.slow
def test_ladder_is_monotone_and_documented_order():
    lad = metrics.ladder("mnist")
    assert lad["test vs test"] <= 1e-6
    assert lad["train-10000 vs test"] < lad["noise 0.1"] < lad["noise 0.25"] < lad["noise 0.5"]
    assert lad["blur 1.0"] < lad["blur 2.0"]
    json.dumps(lad)


def test_metrics_commands_refuse_bad_sizes_and_unwritable_out_before_any_work(tmp_path, capsys):
    import time

    from lipgan.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    t0 = time.process_time()
    for argv, says in (
        (["train-extractor", "mnist", "--out", str(afile)], "a file is where a folder"),
        (["train-extractor", "mnist", "--epochs", "100000000"], "--epochs must be"),
        (["ladder", "mnist", "--n", "1000000000"], "--n must be an integer from 128 to 60000"),
    ):
        assert main(["metrics", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert time.process_time() - t0 < 5  # nothing was trained or scored
    assert afile.read_text() == "x"
