"""``ask``: one question about a raster extent, answered in text.

The extent goes to the model as one tile: at native resolution when it fits, otherwise as an
overview of the whole extent downsampled to one tile. The output says which.
"""
from __future__ import annotations

import argparse
import sys

from .detect import add_area_arguments, add_model_arguments, backend_spec, tile_spec

HELP = "ask a model a question about a raster extent and print its answer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_area_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--task", default="chat", choices=("chat", "caption", "vqa", "classify"),
                        help="chat (default): the question as is; vqa: a short answer; "
                             "classify: one of --classes")
    parser.add_argument("--classes", help="classify: comma-separated class names")


def overview_spec(args: argparse.Namespace, family: str):
    """A TileSpec that covers the extent with one tile, and a sentence saying how."""
    from ..core.chat import overview_spec as one_tile_spec

    return one_tile_spec(args.raster, tile_spec(args, family, overlap=0.0), args.extent,
                         args.extent_crs, args.aoi)


def run(args: argparse.Namespace) -> int:
    from ..core.pipeline import Job, run_job
    from ..core.runtime.backend import open_backend

    spec = backend_spec(args)
    tiles, how = overview_spec(args, spec.family)
    classes = [c.strip() for c in (args.classes or "").split(",") if c.strip()]
    job = Job(raster=args.raster, task=args.task, prompts=[args.prompt], family=spec.family,
              extent=args.extent, extent_crs=args.extent_crs, aoi=args.aoi, tile_spec=tiles,
              classes=classes, backend=spec, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature)
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
