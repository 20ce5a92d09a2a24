"""``convert geochat SRC OUT --to hf|gguf``: GeoChat's checkpoint -> standard LLaVA or GGUF."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..core.errors import ModelError
from ..core.weights.convert_hf import convert_geochat_to_hf
from ..core.weights.gguf_writer import convert_geochat_to_gguf
from .os_errors import os_error_message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", choices=["geochat"], help="source model family")
    parser.add_argument("src", type=Path, help="GeoChat checkpoint folder (e.g. MBZUAI/geochat-7B)")
    parser.add_argument("out", type=Path, help="new output folder")
    parser.add_argument("--to", choices=["hf", "gguf"], required=True, help="output format")
    parser.add_argument("--quant", choices=["q8_0", "q4_k_m"], help="GGUF only: quantise the text model")
    parser.add_argument("--clip", type=Path, help="openai/clip-vit-large-patch14-336 folder "
                        "(default: SRC/clip); GeoChat runs this tower, not the copy in its checkpoint")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="output float type (default: the checkpoint's; GGUF: float32 or float16)")


class _Progress:
    """One self-updating line on a terminal, a line per 10 % otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = -1
        self.start = time.monotonic()

    def __call__(self, done: int, total: int, name: str) -> None:
        percent = done * 100 // total
        if self.tty:
            print(f"\r{percent:3d}% {done}/{total} {name[:60]:<60}", end="", file=sys.stderr, flush=True)
            if done == total:
                print(file=sys.stderr)
        elif percent // 10 != self.last // 10 or done == total:
            print(f"{percent}% ({done}/{total} tensors)", file=sys.stderr, flush=True)
        self.last = percent


def run(args: argparse.Namespace) -> int:
    try:
        return _convert(args)
    except OSError as exc:  # a full disk, a read-only folder: nothing is left behind
        raise ModelError(
            f"The conversion to {args.out} stopped, nothing was written: "
            f"{os_error_message(exc, _existing(args.out))}."
        ) from None


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _convert(args: argparse.Namespace) -> int:
    progress = _Progress()
    if args.to == "hf":
        if args.quant:
            raise ModelError("--quant applies to --to gguf only; transformers loads the float model.")

        out = convert_geochat_to_hf(args.src, args.out, clip=args.clip, dtype=args.dtype, progress=progress)
    else:
        if args.dtype == "bfloat16":
            raise ModelError("GGUF output is float32 or float16; use --quant for smaller files.")

        out = convert_geochat_to_gguf(args.src, args.out, clip=args.clip, quant=args.quant,
                                      dtype=args.dtype, progress=progress)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"converted {args.src} -> {out} ({args.to}, {size:.1f} MiB, "
          f"{time.monotonic() - progress.start:.1f} s)")
    return 0
