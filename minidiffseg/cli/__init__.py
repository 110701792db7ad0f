"""`minidiffseg COMMAND ...`: thin commands over the library. Every command module has
`register(subparsers)`; a `UserError` anywhere becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from ..errors import UserError

COMMANDS = [  # modules with register(subparsers), in the order `--help` lists them
    "minidiffseg.cli.segment",  # segment, maps
    "minidiffseg.cli.explore",  # explore (a web page; the optional gradio extra)
    "minidiffseg.cli.filter",  # filter
    "minidiffseg.cli.evaluate",  # eval, calibrate
    "minidiffseg.cli.download", "minidiffseg.cli.inspect_weights",  # download, inspect-weights
    "minidiffseg.cli.bench",  # bench (from a source checkout)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minidiffseg", description="Open-vocabulary segmentation from "
                                     "Stable Diffusion 1.5 attention (DiffSegmenter), minimal and from scratch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The library warns with `warnings.warn`; on the command line a warning is one plain line."""
    print(f"minidiffseg: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except UserError as e:
        print(f"minidiffseg: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("minidiffseg: interrupted; completed outputs are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
