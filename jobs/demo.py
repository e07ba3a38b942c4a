"""``mnv3-pipeline demo``: the whole loop on an embedded default (synth -> finetune -> annotate)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on synthetic data (local Ray, no network)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("mnv3-pipeline demo: not yet implemented (see the demo issue); nothing was run.", file=sys.stderr)
    return 3
