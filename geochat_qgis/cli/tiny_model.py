"""``make-tiny-model``: build a tiny random-weight model for tests and demos (seconds, ~1 MB)."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "build a tiny random-weight GeoChat (HF folder, GGUF pair or GeoChat-style checkpoint)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("outdir", type=Path, help="new (or empty) folder to write")
    parser.add_argument("--family", choices=["geochat"], default="geochat", help="model family")
    parser.add_argument("--format", dest="fmt", choices=["hf", "gguf", "geochat-checkpoint"],
                        default="hf", help="hf: LLaVA folder for transformers; gguf: model.gguf + "
                        "mmproj.gguf for llama.cpp; geochat-checkpoint: as GeoChat saves it")
    parser.add_argument("--quant", choices=["q8_0", "q4_k_m"], help="quantise the GGUF text model")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same model)")


def run(args: argparse.Namespace) -> int:
    from ..core.errors import ModelError
    from ..core.weights.tiny import build_tiny_geochat

    if args.quant and args.fmt != "gguf":
        raise ModelError("--quant applies to --format gguf only.")
    try:
        out = build_tiny_geochat(args.outdir, args.fmt, seed=args.seed, quant=args.quant)
    except ModuleNotFoundError as exc:  # torch/safetensors: a checkpoint is written with them
        raise ModelError(
            f"make-tiny-model writes a torch checkpoint and needs {exc.name}, which this Python "
            f"lacks (No module named {exc.name!r}): install the transformers backend "
            f"(python -m geochat_qgis deps install transformers) or use the demo model "
            f"(--model tiny-demo), which needs no torch.") from None
    files = sorted(p.name for p in out.iterdir())
    print(f"tiny {args.family} ({args.fmt}) written to {out}: {', '.join(files)}")
    return 0
