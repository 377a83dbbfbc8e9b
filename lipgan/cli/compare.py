"""`lipgan compare --methods ... [--variant NAME:k=v,...] --seeds N --budget 20m|--steps N --out DIR
[--jobs N] [flags]`."""

from __future__ import annotations

#: TrainConfig fields compare sets for each run itself (its --steps/--budget, --out, --quiet)
_SET_BY_COMPARE = ("method", "seed", "steps", "max_time_s", "max_cpu_s", "out",
                   "quiet")


def register(sub) -> None:
    from lipgan.compare import DEFAULT_METHODS
    from lipgan.train.config import TrainConfig, add_flags

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
    p.add_argument(
        "--budget-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what --budget counts: wall seconds (default) or each run's CPU seconds (all its "
        "threads; equal compute per method whatever else loads the machine)",
    )
    p.add_argument("--out", required=True, help="comparison folder (runs/, results.csv, report)")
    g = p.add_argument_group(
        "training flags passed to every run (every `lipgan train` field; default: its own)"
    )
    add_flags(g, TrainConfig, exclude=_SET_BY_COMPARE)
    g.add_argument(
        "--train-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a `lipgan train` field for every run as KEY=VALUE, e.g. threads=2 (repeatable)",
    )
    e = p.add_argument_group("evaluation")
    e.add_argument(
        "--eval-n", type=int, default=10000, help="samples per run for eval.json (default 10000)"
    )
    e.add_argument("--no-eval", action="store_true", help="do not score the runs")
    e.add_argument(
        "--raw",
        action="store_true",
        help="score each run's raw generator (the last iterate) instead of its EMA generator; "
        "a run whose eval.json is of the other one is scored again",
    )
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
    from lipgan.compare import (
        DEFAULT_METHODS,
        TRAIN_FLAGS,
        CompareConfig,
        parse_duration,
        run_compare,
    )
    from lipgan.errors import LipganError
    from lipgan.experiments import sweep
    from lipgan.train.config import TrainConfig, given_flags, parse_options

    variants = [sweep.parse_variant(v) for v in args.variant]
    if args.variants:
        variants += sweep.read_variants(args.variants)
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        methods = [] if variants else list(DEFAULT_METHODS)
    # compare's own --steps, --out and --quiet share their names with TrainConfig fields
    options = {k: v for k, v in given_flags(args, TrainConfig).items() if k not in _SET_BY_COMPARE}
    named = {k: options.pop(k) for k in TRAIN_FLAGS if k in options}
    options.update(parse_options(args.train_option, "--train-option"))
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
        budget_clock=args.budget_clock,
        steps=args.steps,
        **named,
        train_options=options,
        variants=variants,
        eval_n=args.eval_n,
        evaluate=not args.no_eval,
        raw=args.raw,
        retry_failed=args.retry_failed,
        quiet=args.quiet,
        jobs=args.jobs,
    )
    paths = run_compare(cfg)
    print(f"results: {paths['results']}")
    if paths["report"]:
        print(f"report: {paths['report']}")
    return 0
