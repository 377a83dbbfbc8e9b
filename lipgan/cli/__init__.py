"""The `lipgan` command line: parses arguments and calls the library, nothing else.

Each module of this package (other than those starting with ``_``) is one command group and
exposes ``register(subparsers)``, which adds its sub-parser(s) and sets ``func`` to a callable
taking the parsed namespace and returning an exit status. Modules are found by name, so a new
command needs no edit here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from lipgan.errors import LipganError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lipgan",
        description="Lipschitz-constrained networks: WGANs, layer norms, network bounds.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except LipganError as exc:
        print(f"lipgan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lipgan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        # A file operation the library did not wrap: still one line that names the path.
        from lipgan.runs.files import os_error

        print(f"lipgan: error: {os_error(exc)}", file=sys.stderr)
        return 2
    return int(status or 0)
