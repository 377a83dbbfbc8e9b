"""`lipgan metrics train-extractor NAME [--seed] [--epochs]`."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "metrics", help="the feature extractors behind FID, KID and the other scores"
    )
    msub = p.add_subparsers(dest="metrics_command", metavar="ACTION")
    msub.required = True
    t = msub.add_parser(
        "train-extractor",
        help="train a dataset's feature extractor (a small CNN) and install its weights",
    )
    t.add_argument("name", help="mnist or fashion-mnist")
    t.add_argument("--seed", type=int, default=0, help="seed of weights, batches, augmentation")
    t.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs (default: 4)",
    )
    t.add_argument(
        "--out",
        default=None,
        help="folder for NAME.safetensors and NAME.json (default: the package's weights folder)",
    )
    t.set_defaults(func=_train)

    lad = msub.add_parser(
        "ladder",
        help="reference FIDs: train vs test (the floor), test with noise and blur",
    )
    lad.add_argument("name", help="mnist or fashion-mnist")
    lad.add_argument("--n", type=int, default=10000, help="training images for the floor rung")
    lad.add_argument("--seed", type=int, default=0)
    lad.add_argument("--full", action="store_true", help="every score, not only FID")
    lad.add_argument("--json", action="store_true", help="print one JSON object")
    lad.set_defaults(func=_ladder)


def _train(args) -> int:
    from lipgan.metrics import extractor, sampling
    from lipgan.runs.files import check_writable

    if args.epochs is not None:
        sampling.check_range("--epochs", args.epochs, 1, 1000)
    check_writable(args.out or extractor.WEIGHTS_DIR)  # before minutes of training, not after
    net, rec = extractor.train(args.name, seed=args.seed, epochs=args.epochs)
    path = extractor.save(net, rec, args.out)
    print(
        f"{args.name}: test accuracy {rec['test_accuracy']:.4f}  {rec['n_parameters']} parameters  "
        f"{path.stat().st_size / 1e6:.2f} MB  -> {path}"
    )
    return 0


def _ladder(args) -> int:
    import json

    from lipgan import metrics
    from lipgan.metrics import sampling

    sampling.check_range("--n", args.n, metrics.FEATURE_DIM, 60000)  # MNIST's training set
    sampling.check_range("--seed", args.seed, 0, sampling.MAX_SEED)
    res = metrics.ladder(args.name, n=args.n, seed=args.seed, full=args.full)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    if not args.full:
        for name, value in res.items():
            print(f"{name:20s} FID {value:10.4f}")
        return 0
    keys = ("fid", "kid", "is", "precision", "recall", "density", "coverage", "classes_covered")
    print(f"{'set':20s}" + "".join(f"{k[:9]:>10s}" for k in keys))
    for name, r in res.items():
        cells = "".join(f"{r[k]:10d}" if isinstance(r[k], int) else f"{r[k]:10.4f}" for k in keys)
        print(f"{name:20s}{cells}")
    return 0
