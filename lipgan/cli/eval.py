"""`lipgan eval RUN [--n 10000] [--json]` and `lipgan eval --samples FILE|DIR --dataset NAME`.

Every flag is a field of :class:`EvalOptions`, made by :func:`lipgan.train.config.add_flags`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lipgan.train.config import Config, option


@dataclass
class EvalOptions(Config):
    """`lipgan eval`'s options. Their types are checked here; the sizes by
    :mod:`lipgan.metrics.sampling` (``--n`` from 128, or 0 for a whole sample file, to 200000;
    ``--batch-size`` 1 to 65536; ``--seed`` 0 to 2^63-1), which names the flag and is also what
    ``lipgan compare`` calls."""

    samples: str | None = option(
        None, ".npy/.npz array of 28x28 images or a folder of PNG files (instead of RUN)"
    )
    dataset: str | None = option(
        None, "mnist or fashion-mnist (default: the run's dataset, else mnist)"
    )
    n: int = option(10000, "samples to generate/score (at most 200000)")
    seed: int = option(0, "seed of the latent draws and subsets")
    batch_size: int = option(500, "generation batch size")
    json: bool = option(False, "print one JSON object instead of a table")
    raw: bool = option(
        False, "score a run folder's raw generator (the last iterate); without it, its moving "
        "average generator_ema.safetensors where the run keeps one",
    )  # fmt: skip


def register(sub) -> None:
    from lipgan.train.config import add_flags

    p = sub.add_parser(
        "eval",
        help="sample quality (FID, KID, IS, precision/recall, density/coverage, classes)",
        description=(
            "Score a run's generator (writes RUN/eval.json) or any sample set (.npy, .npz or a "
            "folder of 28x28 PNGs) with the shipped domain feature extractor."
        ),
    )
    p.add_argument("run", nargs="?", help="run folder or exported generator .safetensors")
    add_flags(p, EvalOptions)
    p.set_defaults(func=_eval)


def _eval(args) -> int:
    from lipgan.errors import LipganError
    from lipgan.train.config import from_args

    opts = from_args(args, EvalOptions)
    if (args.run is None) == (opts.samples is None):
        raise LipganError("give either a RUN folder or --samples FILE|DIR (exactly one)")
    if opts.samples is not None:
        return _eval_samples(opts)
    return _eval_run(args.run, opts)


def _eval_samples(args: EvalOptions) -> int:
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


def _eval_run(run: str, args: EvalOptions) -> int:
    import sys
    from pathlib import Path

    from lipgan.metrics import sampling

    res = sampling.evaluate_run(
        run,
        n=args.n,
        dataset=args.dataset,
        seed=args.seed,
        batch_size=args.batch_size,
        details=True,
        raw=args.raw,
    )
    if res["generator"] == "ema":
        print(f"scored the EMA generator ({sampling.EMA_FILE}); --raw for the last iterate",
              file=sys.stderr)  # fmt: skip
    if Path(run).is_dir():
        print(f"wrote {Path(run) / 'eval.json'}", file=sys.stderr)
    _print(res, args.json)
    return 0


def generate(gen, z_dim: int, n: int, seed: int = 0, batch_size: int = 500):
    """Kept for benchmarks/bench_eval.py: :func:`lipgan.metrics.sampling.generate`."""
    from lipgan.metrics import sampling

    return sampling.generate(gen, n, seed=seed, batch_size=batch_size)


def _print(res: dict, as_json: bool) -> None:
    from lipgan.metrics import EVAL_KEYS

    if as_json:
        which = {"generator": res["generator"]} if "generator" in res else {}
        print(json.dumps({**{k: res[k] for k in EVAL_KEYS}, **which}))
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
    if res.get("generator") in ("ema", "raw"):
        rows.append(("generator", res["generator"], "moving average or last iterate (--raw)"))
    for name, val, note in rows:
        print(f"{name:16s} {val:>22s}  {note}")
    print("class histogram  " + " ".join(str(c) for c in res["class_histogram"]))
    print(f"extractor        {res['dataset']} sha256 {res['extractor_sha256'][:16]}")
