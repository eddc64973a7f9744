"""The ``fastpe`` command line: ``fastpe <command> --help`` for each command."""

from __future__ import annotations

import argparse
import sys


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run every encoding on a synthetic batch and print a table")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=50)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=lambda args: __import__("fastpe.demo", fromlist=["main"]).main(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    from fastpe.train.cli import add_study, add_train

    add_train(sub)
    add_study(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
