"""``ask``: one question about a raster extent, answered in text.

The extent goes to the model as one tile: at native resolution when it fits, otherwise as an
overview of the whole extent downsampled to one tile. The output says which.
"""
from __future__ import annotations

import argparse
import sys

from ..core.jobs import build_job, overview
from ..core.pipeline import run_job
from ..core.runtime.backend import open_backend
from .detect import add_area_arguments, add_model_arguments, job_request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_area_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--task", default="chat", choices=("chat", "caption", "vqa", "classify"),
                        help="chat (default): the question as is; vqa: a short answer; "
                             "classify: one of --classes")
    parser.add_argument("--classes", help="classify: comma-separated class names")


def run(args: argparse.Namespace) -> int:
    request = job_request(args)
    job = build_job(request)  # a question: the one-tile overview of the extent
    spec = job.backend
    how = overview(request, spec)[1]
    backend = open_backend(spec, args.runtime)
    try:
        result = run_job(job, backend, on_token=_echo if sys.stdout.isatty() else None)
    finally:
        backend.close()
    if result.error or not result.answers:
        reason = result.error or "; ".join(f.message for f in result.failures) or "no tile"
        print(f"error: {reason}", file=sys.stderr)
        return 1
    answer = result.answers[0]
    if sys.stdout.isatty():
        print()
    else:
        print(answer.text or answer.raw)
    print(f"(looked at {how}; {answer.generated_tokens} tokens in {answer.seconds:.1f} s)",
          file=sys.stderr)
    return 0


def _echo(index: int, piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
