"""`minidiffseg explore`: the command that serves the attention explorer, a local web page (Gradio, the
optional `explore` extra; docs/explore.md). Its arguments, the checks of --host and --port, loading the
model, and serving until Ctrl-C; the page itself is `minidiffseg.explorer`."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import time
from typing import NoReturn

from ..errors import UserError
from ..explorer.app import INSTALL, build_app, gradio, launch
from ..method.segmenter import Segmenter
from ..sd import load_sd
from .options import add_model_args, device_of, precision_of

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    p = subparsers.add_parser("explore", help="a local web page to explore the attention maps of a run "
                              f"(needs the explore extra: {INSTALL})")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 shares the page with the network)")
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    p.add_argument("--resolution", type=int, help="square side the image is stretched to (÷64; default: the "
                   "segmenter's, the size the model was trained at)")
    p.set_defaults(func=run_explore)


def check_address(host: str, port: int | None) -> None:
    """One-line errors now, rather than the web server's, for a --host that is not an address of this machine
    and a --port that is taken (or not a port)."""
    if port is not None and not 0 < port < 65536:
        raise UserError(f"--port {port}: give a port in 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.bind((host, 0))
    except OSError as e:
        raise UserError(f"--host {host} is not an address of this machine ({e.strerror or e}): use 127.0.0.1 "
                        "(this machine only) or 0.0.0.0 (every network)") from None
    if port is not None:
        try:
            with socket.socket(family) as s:
                s.bind((host, port))
        except OSError as e:
            raise UserError(f"--port {port} on {host} cannot be used ({e.strerror or e}): another program listens "
                            "there; give another --port or leave it out to take a free one") from None


def run_explore(args) -> int:
    """Serve the page until Ctrl-C, which ends the command with 0 within a few seconds at any point: while
    gradio imports or the model loads (nothing is served yet), or while serving (see `serve`)."""
    try:
        return serve(args)
    except KeyboardInterrupt:  # before the page was served
        leave(0)


def serve(args) -> int:
    gradio()  # fail before loading any weights
    check_address(args.host, args.port)
    device = device_of(args)
    options = {} if args.resolution is None else {"resolution": args.resolution}
    stream = bool(getattr(args, "stream", False))  # --stream, where the shared model options have it
    p = precision_of(args, device)  # half precision on a CPU without fast half arithmetic: fp32, weights kept half
    seg = Segmenter(load_sd(args.weights, device=device, dtype=p.compute, stream=stream,
                            keep=None if stream else p.keep), **options)
    app = build_app(seg, title=f"weights {args.weights} · {seg.device.type} · {str(seg.dtype).replace('torch.', '')} "
                    f"· images stretched to {seg.resolution}²")
    if args.host not in LOCAL_HOSTS:
        print(f"minidiffseg: warning: listening on {args.host}, not only 127.0.0.1: anyone who can reach this "
              "machine can use the page and run the model", file=sys.stderr)
    # from here on Ctrl-C only asks to stop: no KeyboardInterrupt lands inside Gradio's launch or close
    ctrl_c: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: ctrl_c.append(number))
    try:
        try:
            url = launch(app, args.host, args.port)
        except OSError as e:  # no free port from 7860 on
            raise UserError(f"cannot serve on {args.host}{'' if args.port is None else f':{args.port}'}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        print(f"minidiffseg explore: {url} (Ctrl-C stops)", file=sys.stderr)
        while not ctrl_c and app.is_running:
            time.sleep(0.1)
    finally:
        app.close()  # the queue, then the web server: Gradio joins its thread for at most 5 s
        signal.signal(signal.SIGINT, previous)
    if ctrl_c:
        leave(0)
    return 0


def leave(code: int) -> NoReturn:
    """End the process now with `code`, after what a normal exit runs (the atexit functions: the page's
    temporary folders, logging) but without tearing down the interpreter: freeing torch's, Gradio's and the
    model libraries' ~340 k objects with full garbage collections costs ~1 s of CPU, which on a loaded
    2-core machine took 3-16 s after Ctrl-C (over 30 s once); and no thread of the web server (an open
    connection, a run still on the model) can hold the exit up. Only for the command's own process."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to say
            pass
    os._exit(code)
