"""``runtime serve``: the model runtime child (JSON lines on stdin/stdout; started by the plugin)."""
from __future__ import annotations

import argparse
import os
import sys

from ..core.runtime.server import serve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="run the child side of the runtime protocol")
    serve.add_argument("--heartbeat", type=float, default=1.0,
                       help="seconds between heartbeat messages (default 1)")


def run(args: argparse.Namespace) -> int:
    # The protocol owns the real stdout; anything else printed (by Python or by native code
    # such as llama.cpp) goes to stderr, which the parent keeps for its error messages.
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return serve(sys.stdin, protocol_out, args.heartbeat)
