"""`lipgan classify`: train a classifier with a Lipschitz method and measure the note's chain.

Every flag but the command's own few is a field of :class:`ClassifyConfig`
(:mod:`lipgan.train.classifier_config`), made by :func:`lipgan.train.config.add_flags`.
"""

from __future__ import annotations

import argparse
import json

#: the command's defaults where they differ from the dataclass's
_DEFAULTS = {"threads": 1}


def register(sub) -> None:
    from lipgan.train.classifier_config import ClassifyConfig
    from lipgan.train.config import add_flags

    p = sub.add_parser(
        "classify",
        help="train a classifier with a regularizer; measure bounds, sensitivity, robustness",
        description=(
            "Train a small classifier on a training subset with one Lipschitz method, then measure "
            "train/test accuracy, Lipschitz bounds, input and parameter sensitivity, accuracy "
            "under noise and L2 PGD, certified accuracy and the loss's smoothness. Writes "
            "OUT/config.yaml, OUT/results.json and OUT/classifier.safetensors."
        ),
    )
    add_flags(p, ClassifyConfig, exclude=("eps",), defaults=_DEFAULTS)
    unset = argparse.SUPPRESS  # not in the namespace unless given: from_args knows what was set
    p.add_argument("--eps", type=float, nargs="+", default=unset, help="L2 radii (default 0.5 1 2)")
    p.add_argument("--no-eval", dest="evaluate", action="store_false", default=unset,
                   help="train and report accuracy only (as --no-evaluate)")  # fmt: skip
    p.add_argument(
        "--reevaluate",
        metavar="RUN",
        help="measure a finished run folder again (no training); evaluation flags given here "
        "replace those in RUN/config.yaml, the others are kept from it",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the classify run already in --out"
    )
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=_classify)


def _classify(args) -> int:
    from lipgan.classify import reevaluate, run
    from lipgan.train.classifier_config import ClassifyConfig
    from lipgan.train.config import from_args, given_flags

    if args.reevaluate:
        res = reevaluate(args.reevaluate, overrides=given_flags(args, ClassifyConfig))
        args.out = args.reevaluate
        return _print(res, args)
    cfg = from_args(args, ClassifyConfig, base=_DEFAULTS)
    args.out = cfg.out
    res = run(cfg, log=None if args.json else print, overwrite=args.overwrite)
    return _print(res, args)


def _print(res: dict, args) -> int:
    from lipgan.classify import GLORO_MNIST

    if args.json:
        print(json.dumps(res.get("summary", res.get("accuracy")), indent=2))
        return 0
    a = res["accuracy"]
    print(
        f"train acc {a['train_acc']:.4f}  test acc {a['test_acc']:.4f}  gap {a['gap_acc']:+.4f}  "
        f"loss gap {a['gap_loss']:+.4f}  (trained in {res['train_s']:.1f}s)"
    )
    if "lipschitz" in res:
        lip = res["lipschitz"]
        ups = "  ".join(f"{k} {v:.4g}" for k, v in lip["upper"].items())
        print(f"Lipschitz upper: {ups}  lower {lip['lower']:.4g}")
        for eps, r in res["robustness"]["per_eps"].items():
            extra = (
                f"  certified(pairwise) {r['certified_pairwise_acc']:.4f}"
                if "certified_pairwise_acc" in r
                else ""
            )
            ref = GLORO_MNIST.get(float(eps)) if res["config"].get("certify") else None
            if ref is not None:
                extra += f"  (GloRo, Leino et al. 2021: {ref:.3f})"
            print(
                f"eps {eps:>4s}: gauss acc {r['gauss_acc']:.4f}  PGD acc {r['pgd_acc']:.4f}  "
                f"certified {r['certified_acc']:.4f}{extra}"
            )
        print(
            "smoothness (top Hessian eigenvalue of the loss): "
            f"{res['smoothness']['hessian_top']:.4g}"
        )
    if args.out:
        print(f"wrote {args.out}/results.json ({res['wall_s']:.1f}s in all)")
    return 0
