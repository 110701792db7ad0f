"""`minidiffseg bench`: latency and memory per stage against the diffusers recipe (docs/design.md §6).

Thin: the benchmark is the scripts in bench/ of a source checkout (`python -m bench.run` is the same
thing); this command only finds them and hands them its arguments. It is not part of an installed
wheel, whose users have no bench/ folder.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from ..errors import UserError

ROOT = Path(__file__).resolve().parents[2]  # the source checkout, when there is one


def register(subparsers) -> None:
    help = "benchmark latency and memory per stage against the diffusers recipe (source checkout)"
    if not (ROOT / "bench" / "run.py").is_file():
        p = subparsers.add_parser("bench", help=help)
        p.set_defaults(func=_no_checkout)
        return
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    run = importlib.import_module("bench.run")
    p = subparsers.add_parser("bench", help=help, description=run.__doc__.split("\n\n")[0])
    run.add_arguments(p)


def _no_checkout(args) -> int:
    raise UserError(f"no bench/ folder next to {Path(__file__).parent}: the benchmark runs from a source checkout "
                    "(git clone the repository, pip install -e '.[bench]', then minidiffseg bench --quick)")
