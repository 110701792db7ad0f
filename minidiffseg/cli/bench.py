"""`minidiffseg bench`: latency and memory per stage against the diffusers recipe (docs/design.md §6).

Thin: the benchmark is the scripts in bench/ of a source checkout (`python -m bench.run` is the same
thing); this command only finds them and hands them its arguments. It is not part of an installed
wheel, whose users have no bench/ folder.

bench/run.py owns the options, and it is imported only when the command runs: building minidiffseg's
parser (for any command, or `--help`) imports nothing of bench/. The words after `bench` are kept as they
are and parsed by bench/run.py's options then, so `minidiffseg bench --help` lists them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ..errors import UserError

ROOT = Path(__file__).resolve().parents[2]  # the source checkout, when there is one
HELP = "benchmark latency and memory per stage against the diffusers recipe (source checkout)"


def register(subparsers) -> None:
    if not (ROOT / "bench" / "run.py").is_file():
        p = subparsers.add_parser("bench", help=HELP)
        p.set_defaults(func=_no_checkout)
        return
    # no prefix character is "-" here, so every word (`--quick`, `--help`, ...) is kept as a plain argument
    p = subparsers.add_parser("bench", help=HELP, add_help=False, prefix_chars="\0")
    p.add_argument("words", nargs="*")
    p.set_defaults(func=_run)


def parser():
    """`minidiffseg bench`'s own parser: bench/run.py's options (imports bench/)."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    run = importlib.import_module("bench.run")
    p = argparse.ArgumentParser(prog="minidiffseg bench", description=run.__doc__.split("\n\n")[0])
    run.add_arguments(p)
    return p


def _run(args) -> int:
    options = parser().parse_args(args.words)
    return options.func(options)


def _no_checkout(args) -> int:
    raise UserError(f"no bench/ folder next to {Path(__file__).parent}: the benchmark runs from a source checkout "
                    "(git clone the repository, pip install -e '.[bench]', then minidiffseg bench --quick)")
