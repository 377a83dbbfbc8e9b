"""`lipgan compare --methods ... --seeds N --budget 20m|--steps N --out DIR [--jobs N] [flags]`."""

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
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated trainer presets (default {','.join(DEFAULT_METHODS)})",
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
    import yaml

    from lipgan.compare import CompareConfig, parse_duration, run_compare
    from lipgan.errors import LipganError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    options = {}
    for item in args.train_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LipganError(f"--train-option {item!r}: write KEY=VALUE, e.g. threads=2")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
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
