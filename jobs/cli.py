"""The ``mnv3-pipeline`` console script: one parser, one module per subcommand.

Each module listed in ``SUBCOMMANDS`` lives in ``jobs/<name>.py`` and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ["synth", "demo", "export_coco", "evaluate", "annotate", "finetune", "quantize", "benchmark"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnv3-pipeline",
        description="Batch image annotation with MobileNetV3 models on Ray (CPU).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"jobs.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
