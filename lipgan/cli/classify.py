"""`lipgan classify`: train a classifier with a Lipschitz method and measure the note's chain."""

from __future__ import annotations

import json


def register(sub) -> None:
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
    p.add_argument(
        "--reg",
        default="none",
        help="none|l2|frobenius|snr|sn|gp or any lipgan.constraints name, e.g. bjorck "
        "(default none)",
    )
    p.add_argument(
        "--reg-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the method's constraint, e.g. iters=30 for bjorck (repeatable)",
    )
    p.add_argument("--lam", type=float, help="regularizer strength (default: the method's own)")
    p.add_argument("--sn-mode", default="operator", help="for --reg sn: operator or reshaped")
    p.add_argument("--model", default="mlp", help="mlp or cnn (default mlp)")
    p.add_argument(
        "--activation", help="relu, tanh or minmax (default relu; minmax with --certify)"
    )
    p.add_argument("--width", type=int, help="hidden width (mlp) or dense width (cnn)")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or an IDX folder")
    p.add_argument("--data-dir", help="read the four IDX files from this folder")
    p.add_argument("--train-subset", type=int, default=5000, help="training images (0 = all)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--certify",
        type=float,
        metavar="EPS",
        help="Lipschitz-margin training for certified L2 robustness at radius EPS",
    )
    p.add_argument("--eps", type=float, nargs="+", help="L2 radii to evaluate (default 0.5 1 2)")
    p.add_argument("--eval-n", type=int, help="test images for robustness checks (default 1000)")
    p.add_argument("--pgd-steps", type=int, help="PGD steps (default 20)")
    p.add_argument("--pgd-restarts", type=int, help="PGD restarts (default 1)")
    p.add_argument("--hessian-iters", type=int, help="Lanczos steps for the Hessian (default 20)")
    p.add_argument("--lipsdp", action="store_true", help="add LipSDP-Neuron upper bounds (slower)")
    p.add_argument(
        "--reevaluate",
        metavar="RUN",
        help="measure a finished run folder again (no training); evaluation flags given here "
        "replace those in RUN/config.yaml, the others are kept from it",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-eval", action="store_true", help="train and report accuracy only")
    p.add_argument("--out", help="run folder to write (default: print only)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the classify run already in --out"
    )
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=_classify)


_EVAL_FLAGS = ("eval_n", "pgd_steps", "pgd_restarts", "hessian_iters", "eps")


def _classify(args) -> int:
    from lipgan.classify import ClassifyConfig, reevaluate, run
    from lipgan.experiments.sweep import parse_options

    given = {k: getattr(args, k) for k in _EVAL_FLAGS if getattr(args, k) is not None}
    if args.lipsdp:
        given["lipsdp"] = True
    if given.get("eps"):
        given["eps"] = list(given["eps"])
    if args.reevaluate:
        res = reevaluate(args.reevaluate, overrides=given)
        args.out = args.reevaluate
        return _print(res, args)
    cfg = ClassifyConfig(
        model=args.model,
        activation=args.activation,
        width=args.width,
        dataset=args.dataset,
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        reg=args.reg,
        lam=args.lam,
        reg_options=parse_options(args.reg_option, "--reg-option"),
        sn_mode=args.sn_mode,
        certify=args.certify,
        seed=args.seed,
        threads=args.threads,
        out=args.out,
        evaluate=not args.no_eval,
    )
    for k, v in given.items():
        setattr(cfg, k, v)
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
