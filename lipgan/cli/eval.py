"""`lipgan eval RUN [--n 10000] [--json]` and `lipgan eval --samples FILE|DIR --dataset NAME`."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="sample quality (FID, KID, IS, precision/recall, density/coverage, classes)",
        description=(
            "Score a run's generator (writes RUN/eval.json) or any sample set (.npy, .npz or a "
            "folder of 28x28 PNGs) with the shipped domain feature extractor."
        ),
    )
    p.add_argument("run", nargs="?", help="run folder or exported generator .safetensors")
    p.add_argument("--samples", help=".npy/.npz array of 28x28 images or a folder of PNG files")
    p.add_argument(
        "--dataset",
        default=None,
        help="mnist or fashion-mnist (default: the run's dataset, else mnist)",
    )
    p.add_argument(
        "--n",
        type=int,
        default=10000,
        help="samples to generate/score (default 10000, at most 200000)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the latent draws and subsets")
    p.add_argument("--batch-size", type=int, default=500, help="generation batch size")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_eval)


def _eval(args) -> int:
    from lipgan.errors import LipganError

    if (args.run is None) == (args.samples is None):
        raise LipganError("give either a RUN folder or --samples FILE|DIR (exactly one)")
    if args.samples is not None:
        return _eval_samples(args)
    return _eval_run(args)


def _eval_samples(args) -> int:
    import sys

    from lipgan import metrics
    from lipgan.metrics import samples_io, sampling

    dataset = args.dataset or "mnist"
    sampling.check_range("--n", args.n, 0, sampling.MAX_N)  # 0: every image of the file
    sampling.check_range("--seed", args.seed, 0, sampling.MAX_SEED)
    x, said = samples_io.load_samples(args.samples)
    n = min(args.n, x.shape[0]) if args.n else x.shape[0]
    # Stated on stderr so that --json output stays one parseable object.
    print(f"{said}; scoring {n} against {dataset}", file=sys.stderr)
    res = metrics.evaluate(x, dataset=dataset, n=n, details=True, seed=args.seed)
    _print(res, args.json)
    return 0


def _eval_run(args) -> int:
    import sys
    from pathlib import Path

    from lipgan.metrics import sampling

    res = sampling.evaluate_run(
        args.run,
        n=args.n,
        dataset=args.dataset,
        seed=args.seed,
        batch_size=args.batch_size,
        details=True,
    )
    if Path(args.run).is_dir():
        print(f"wrote {Path(args.run) / 'eval.json'}", file=sys.stderr)
    _print(res, args.json)
    return 0


def generate(gen, z_dim: int, n: int, seed: int = 0, batch_size: int = 500):
    """Kept for benchmarks/bench_eval.py: :func:`lipgan.metrics.sampling.generate`."""
    from lipgan.metrics import sampling

    return sampling.generate(gen, n, seed=seed, batch_size=batch_size)


def _print(res: dict, as_json: bool) -> None:
    from lipgan.metrics import EVAL_KEYS

    if as_json:
        print(json.dumps({k: res[k] for k in EVAL_KEYS}))
        return
    rows = [
        ("FID", f"{res['fid']:.3f}", "Fréchet distance of features to the test set"),
        ("KID", f"{res['kid']:.5f} ± {res['kid_std']:.5f}", "unbiased MMD², can be < 0"),
        ("IS", f"{res['is']:.3f}", "domain-classifier score, at most 10"),
        ("precision", f"{res['precision']:.3f}", "k=3"),
        ("recall", f"{res['recall']:.3f}", "k=3"),
        ("density", f"{res['density']:.3f}", "k=5, ~1 for real data"),
        ("coverage", f"{res['coverage']:.3f}", "k=5"),
        ("classes covered", f"{res['classes_covered']} / 10", ""),
        ("class KL", f"{res['class_kl']:.4f}", "nats, predicted classes vs data"),
        ("n", str(res["n"]), f"against {res['n_real']} real test images"),
    ]
    for name, val, note in rows:
        print(f"{name:16s} {val:>22s}  {note}")
    print("class histogram  " + " ".join(str(c) for c in res["class_histogram"]))
    print(f"extractor        {res['dataset']} sha256 {res['extractor_sha256'][:16]}")
