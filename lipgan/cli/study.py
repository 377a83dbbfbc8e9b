"""`lipgan study generalization`: the grid of regularizers x strengths x seeds.

Its flags are the fields of :class:`lipgan.study.StudyConfig` (made by
:func:`lipgan.train.config.add_flags`) and the command's own ``--regs``, ``--jobs``,
``--gather-only`` and ``--reevaluate``.
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from lipgan.study import DEFAULT_GRID, StudyConfig
    from lipgan.train.config import add_flags

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
    add_flags(g, StudyConfig)
    g.add_argument(
        "--regs",
        nargs="+",
        default=argparse.SUPPRESS,
        help=f"regularizers to include: classify --reg names (default: {' '.join(DEFAULT_GRID)})",
    )
    g.add_argument(
        "--jobs",
        "--workers",
        dest="jobs",
        type=int,
        default=argparse.SUPPRESS,
        help="cells run at a time, one thread each (default 2; --workers is the old name)",
    )
    g.add_argument("--gather-only", action="store_true", help="only rebuild CSVs, plots, study.md")
    g.add_argument(
        "--reevaluate", action="store_true", help="measure the finished cells again, no training"
    )
    g.set_defaults(func=_generalization)


def _generalization(args) -> int:
    import sys

    from lipgan.study import StudyConfig, gather, run_study
    from lipgan.train.config import from_args

    study = from_args(args, StudyConfig)
    command = "lipgan " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("lipgan") else None
    if args.gather_only:
        gather(study)
    else:
        run_study(study, command=command, reevaluate=args.reevaluate)
    print(f"see {study.out}/study.md, {study.out}/summary.csv and the plots there")
    return 0
