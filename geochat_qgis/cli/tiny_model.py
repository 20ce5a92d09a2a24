"""``make-tiny-model``: build a tiny random-weight model for tests and demos (seconds, ~1 MB)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import ModelError
from ..core.weights.output_dir import staged_output_dir
from ..core.weights.tiny import build_tiny_geochat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("outdir", type=Path, nargs="?", help="new (or empty) folder to write")
    parser.add_argument("--out", type=Path, help="the folder to write (instead of OUTDIR)")
    parser.add_argument("--family", choices=["geochat", "geopixel"], default="geochat", help="model family")
    parser.add_argument("--format", dest="fmt", choices=["hf", "gguf", "geochat-checkpoint"],
                        default="hf", help="hf: LLaVA folder for transformers; gguf: model.gguf + "
                        "mmproj.gguf for llama.cpp; geochat-checkpoint: as GeoChat saves it")
    parser.add_argument("--quant", choices=["q8_0", "q4_k_m"], help="quantise the GGUF text model")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same model)")
    parser.add_argument("--head-dim", type=int, default=16,
                        help="geochat: attention head width of the text model (32 or more for "
                             "vLLM's CPU build)")
    parser.add_argument("--preset", choices=["tiny", "real-width"], default="tiny",
                        help="geopixel: tiny sizes, or GeoPixel-7B's widths with --layers decoder layers")
    parser.add_argument("--layers", type=int, help="geopixel: decoder layers (default: the preset's)")
    parser.add_argument("--demo", action="store_true",
                        help="geopixel: weights whose greedy answer is '<p> a </p> [SEG]', so masks show")


def run(args: argparse.Namespace) -> int:
    outdir = args.out or args.outdir
    if outdir is None or (args.out and args.outdir and args.out != args.outdir):
        raise ModelError("Name one output folder: OUTDIR or --out OUTDIR.")
    if args.quant and args.fmt != "gguf":
        raise ModelError("--quant applies to --format gguf only.")
    try:
        if args.family == "geopixel":
            return _geopixel(args, outdir)

        out = build_tiny_geochat(outdir, args.fmt, seed=args.seed, quant=args.quant,
                                 head_dim=args.head_dim)
    except ModuleNotFoundError as exc:  # GeoPixel's maker runs torch; GeoChat's needs no torch
        backend = ("geopixel" if args.family == "geopixel" else
                   "transformers" if args.fmt == "hf" else "llama.cpp")
        raise ModelError(
            f"make-tiny-model --family {args.family} needs {exc.name}, which this Python lacks "
            f"(No module named {exc.name!r}): install the {backend} backend's packages "
            f"(python -m geochat_qgis deps install {backend}).") from None
    files = sorted(p.name for p in out.iterdir())
    print(f"tiny {args.family} ({args.fmt}) written to {out}: {', '.join(files)}")
    return 0


def _geopixel(args: argparse.Namespace, outdir: Path) -> int:
    from ..core.models.geopixel.tiny import write_tiny_geopixel

    if args.fmt != "hf" or args.quant:
        raise ModelError("--format and --quant are GeoChat options; GeoPixel is written in its published "
                         "layout (pytorch_model-*.bin shards).")
    with staged_output_dir(outdir) as stage:
        write_tiny_geopixel(stage, seed=args.seed, preset=args.preset, layers=args.layers,
                            seg_answer=args.demo)
    files = sorted(p.name for p in outdir.iterdir())
    print(f"tiny geopixel ({args.preset}) written to {outdir}: {', '.join(files)}")
    return 0
