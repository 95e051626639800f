"""`mlora` command line: each command maps to one library function; no logic lives here."""

from __future__ import annotations

import argparse
import sys


def _demo(args):
    from .demo import run_demo

    run_demo()


COMMANDS = {
    "demo": (_demo, "Train LoRA, DyLoRA and MatryoshkaLoRA on the embedded default and report every rank."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlora", description="Nested (Matryoshka) LoRA adapters: train once, deploy at any rank.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=fn)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
