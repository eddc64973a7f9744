"""The ``fastpe`` command line: ``fastpe <command> --help`` for each command."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse with a two-line error (the message and where to find help) instead of the usage
    block, which for ``fastpe train`` runs to dozens of lines."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run every encoding on a synthetic batch and print a table")
    from fastpe.train.validation import positive_int

    p.add_argument("--batch", type=positive_int("sequences per batch"), default=32)
    p.add_argument("--length", type=positive_int("sequence length"), default=50)
    p.add_argument("--d-model", type=positive_int("model width"), default=64)
    p.add_argument("--heads", type=positive_int("attention heads"), default=2)
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=lambda args: __import__("fastpe.demo", fromlist=["main"]).main(args))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastpe", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also FASTPE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    from fastpe.train.cli import add_study, add_train

    add_train(sub)
    add_study(sub)
    return parser


def _resume_command(argv: list[str], out_dir) -> str:
    """The command line that continues an interrupted run: the same options, its folder, --resume."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--out-dir", "--stop-after-epochs"):
            skip = True
            continue
        if arg.startswith(("--out-dir=", "--stop-after-epochs=")) or arg in ("--resume", "--no-resume", "--restart",
                                                                             "--no-restart"):
            continue
        kept.append(arg)
    launched = Path(sys.argv[0])
    program = "python -m fastpe" if (launched.parent.name, launched.name) == ("fastpe", "__main__.py") else "fastpe"
    return f"{program} {shlex.join(kept)} --out-dir {shlex.quote(str(out_dir))} --resume"


def main(argv: list[str] | None = None) -> int:
    """Run a command. A user error (a bad option, a bad data file, a locked folder) prints one or
    two lines on stderr and returns 2; ``--debug`` or ``FASTPE_DEBUG=1`` shows the traceback."""
    from fastpe.train import distributed
    from fastpe.train.validation import USER_ERRORS, TrainingDiverged

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("FASTPE_DEBUG", "") not in ("", "0")
    name = f"fastpe {args.command}"
    try:
        status = args.run(args)
        if status == 0:
            distributed.leave()  # several processes (torchrun): together, once all are done
        return status
    except KeyboardInterrupt as exc:
        if debug:
            raise
        out_dir = getattr(exc, "out_dir", None)
        if out_dir is None:
            print(f"{name}: interrupted", file=sys.stderr)
        else:
            print(f"{name}: interrupted; {exc.detail}. Continue with:\n  {_resume_command(argv, out_dir)}",
                  file=sys.stderr)
        return 130
    except (*USER_ERRORS, TrainingDiverged) as exc:
        if debug:
            raise
        print(f"{name}: error: {exc}\n(add --debug or set FASTPE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1 if isinstance(exc, TrainingDiverged) else 2


if __name__ == "__main__":
    sys.exit(main())
