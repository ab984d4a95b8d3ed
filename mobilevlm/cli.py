"""`mobilevlm <verb>`: one command-line tool, each verb defined next to the code it drives.

Every area module listed here exposes `register(subparsers)`, adds its verbs and sets `func` on each.
Those modules import only argparse at import time, so `mobilevlm --help` stays fast; the heavy imports
happen inside the handlers.
"""
from __future__ import annotations

import argparse
import importlib
import sys

AREA_MODULES = (
    "mobilevlm.chat",          # generate, chat
    "mobilevlm.train.cli",     # train, merge, pipeline
    "mobilevlm.eval.cli",      # eval
    "mobilevlm.export.cli",    # export
    "mobilevlm.fast.cli",      # quantize
    "mobilevlm.serve.cli",     # serve
    "mobilevlm.demo.cli",      # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobilevlm", description="MobileVLM / MobileVLM V2 toolkit")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="verb", metavar="<verb>")
    for name in AREA_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency, not an area that is not built yet
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from mobilevlm import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from mobilevlm.errors import MobileVLMError

    try:
        return int(args.func(args) or 0)
    except MobileVLMError as err:
        print(f"mobilevlm {args.verb}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
