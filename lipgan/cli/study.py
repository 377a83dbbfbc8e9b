"""`lipgan study generalization`: the grid of regularizers x strengths x seeds."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("study", help="run a study of the note's claims")
    ssub = p.add_subparsers(dest="study_command", metavar="STUDY")
    ssub.required = True
    g = ssub.add_parser(
        "generalization",
        help="regularization -> smaller C(w) -> lower sensitivity -> better generalization?",
        description=(
            "Train the grid of regularizers x strengths x seeds on a training subset, gather every "
            "measurement into OUT/cells.csv and OUT/summary.csv, draw the plots and write "
            "OUT/study.md with a reading of each link. Finished cells are skipped (resume)."
        ),
    )
    g.add_argument("--seeds", type=int, default=3)
    g.add_argument("--train-subset", type=int, default=5000)
    g.add_argument("--model", default="mlp", help="mlp or cnn (default mlp)")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--dataset", default="mnist")
    g.add_argument("--data-dir")
    g.add_argument(
        "--regs",
        nargs="+",
        help="regularizers to include: classify --reg names (default: none l2 frobenius snr gp sn)",
    )
    g.add_argument("--eval-n", type=int, default=1000, help="test images for robustness checks")
    g.add_argument(
        "--jobs",
        "--workers",
        dest="jobs",
        type=int,
        default=2,
        help="cells run at a time, one thread each (default 2; --workers is the old name)",
    )
    g.add_argument("--out", default="runs/study-generalization")
    g.add_argument("--gather-only", action="store_true", help="only rebuild CSVs, plots, study.md")
    g.add_argument(
        "--reevaluate", action="store_true", help="measure the finished cells again, no training"
    )
    g.set_defaults(func=_generalization)


def _generalization(args) -> int:
    import sys

    from lipgan.study import DEFAULT_GRID, StudyConfig, gather, run_study

    study = StudyConfig(
        out=args.out,
        seeds=args.seeds,
        train_subset=args.train_subset,
        model=args.model,
        epochs=args.epochs,
        dataset=args.dataset,
        data_dir=args.data_dir,
        regs=list(args.regs) if args.regs else list(DEFAULT_GRID),
        eval_n=args.eval_n,
        jobs=args.jobs,
    )
    command = "lipgan " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("lipgan") else None
    if args.gather_only:
        gather(study)
    else:
        run_study(study, command=command, reevaluate=args.reevaluate)
    print(f"see {args.out}/study.md, {args.out}/summary.csv and the plots there")
    return 0
