"""`lipgan compare --methods ... [--variant NAME:k=v,...] --seeds N --budget 20m|--steps N --out DIR
[--jobs N] [flags]`."""

from __future__ import annotations


def register(sub) -> None:
    from lipgan.compare import DEFAULT_METHODS

    p = sub.add_parser(
        "compare",
        help="train several Lipschitz methods for an equal budget, evaluate, write a report",
        description=(
            "Train every method x seed for the same wall-clock budget (or the same number of "
            "generator steps), score each finished run with lipgan.metrics, and write "
            "OUT/results.csv and OUT/report.html. Run it again on the same OUT to resume: runs "
            "that are done are kept, interrupted ones resume from their checkpoint, failed ones "
            "are reported with their reason."
        ),
    )
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods: trainer presets or constraint names (default "
        f"{','.join(DEFAULT_METHODS)}, or none when --variant or --variants is given)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="a config variant compared too, e.g. w64:method=frobenius,width=64 (any `lipgan "
        "train` field; runs in OUT/runs/NAME-seed<k>; repeatable)",
    )
    p.add_argument(
        "--variants",
        metavar="FILE",
        help="variants from a YAML file: a mapping NAME: {method: ..., width: ..., ...}",
    )
    p.add_argument("--seeds", type=int, default=2, help="seeds per method: 0..N-1 (default 2)")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument(
        "--budget",
        default=None,
        help="wall time per run, like 20m, 90s, 1.5h (default 20m unless --steps is given)",
    )
    bound.add_argument("--steps", type=int, default=None, help="generator steps per run instead")
    p.add_argument("--out", required=True, help="comparison folder (runs/, results.csv, report)")
    g = p.add_argument_group("training flags passed to every run (default: lipgan train's)")
    g.add_argument("--model", help="architecture, e.g. dcgan28")
    g.add_argument("--width", type=int, help="base channel width D")
    g.add_argument("--batch-size", type=int, help="batch size")
    g.add_argument("--device", help="auto, cpu or cuda (also used for the evaluation)")
    g.add_argument(
        "--precision",
        help="auto (the default: bf16 where the device has native bf16), fp32 or bf16",
    )
    g.add_argument("--dataset", help="mnist, fashion-mnist or a folder of IDX files")
    g.add_argument(
        "--train-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other `lipgan train` field for every run, e.g. threads=2 or fid_every=500 "
        "(repeatable)",
    )
    e = p.add_argument_group("evaluation")
    e.add_argument(
        "--eval-n", type=int, default=10000, help="samples per run for eval.json (default 10000)"
    )
    e.add_argument("--no-eval", action="store_true", help="do not score the runs")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="train failed runs again (the failed folder is moved to OUT/failed/)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="runs trained at the same time, each with cpu_count/jobs threads (default 1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_compare)


def _compare(args) -> int:
    from lipgan.compare import DEFAULT_METHODS, CompareConfig, parse_duration, run_compare
    from lipgan.errors import LipganError
    from lipgan.experiments import sweep

    variants = [sweep.parse_variant(v) for v in args.variant]
    if args.variants:
        variants += sweep.read_variants(args.variants)
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        methods = [] if variants else list(DEFAULT_METHODS)
    options = sweep.parse_options(args.train_option, "--train-option")
    budget = None
    if args.steps is None:
        budget = parse_duration(args.budget or "20m")
    if args.eval_n < 1:
        raise LipganError(f"--eval-n must be positive, got {args.eval_n}")
    cfg = CompareConfig(
        out=args.out,
        methods=methods,
        seeds=args.seeds,
        budget_s=budget,
        steps=args.steps,
        model=args.model,
        width=args.width,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        dataset=args.dataset,
        train_options=options,
        variants=variants,
        eval_n=args.eval_n,
        evaluate=not args.no_eval,
        retry_failed=args.retry_failed,
        quiet=args.quiet,
        jobs=args.jobs,
    )
    paths = run_compare(cfg)
    print(f"results: {paths['results']}")
    if paths["report"]:
        print(f"report: {paths['report']}")
    return 0
