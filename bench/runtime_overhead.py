"""Benchmark: what running the model in the isolated runtime child costs per tile.

The project's tiny GeoChat GGUF answers the same 504 px tiles (greedy, a few tokens) through
``SubprocessBackend`` (child process, JSON lines, tiles as base64) and through the raw
llama.cpp backend in this process, in the same run. Prints seconds per tile for both and the
ratio subprocess / in-process, plus the one-off start-and-load time of the child. With the tiny
model the generation itself takes ~0.1 s, so the ratio shows the protocol's overhead at its
most visible; a real 7B model takes seconds per tile and the overhead disappears into it.

    .venv/bin/python bench/runtime_overhead.py [--tiles 20] [--tokens 16]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from geochat_qgis.core.backends.base import Conversation, GenerateOptions  # noqa: E402
from geochat_qgis.core.backends.factory import BackendSpec, create_backend  # noqa: E402
from geochat_qgis.core.runtime.backend import RuntimeSettings, SubprocessBackend  # noqa: E402
from geochat_qgis.core.weights.tiny import build_tiny_geochat  # noqa: E402


def per_tile(backend, tiles, tokens: int) -> float:
    conversation = Conversation.single("[refer] Give me the location of <p> car </p>")
    options = GenerateOptions(max_new_tokens=tokens)
    backend.generate(tiles[:1], conversation, options)  # warm-up
    start = time.perf_counter()
    for tile in tiles:
        backend.generate([tile], conversation, options)
    return (time.perf_counter() - start) / len(tiles)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 255, (504, 504, 3), dtype=np.uint8) for _ in range(args.tiles)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_geochat(Path(tmp) / "tiny", "gguf", seed=0)
        spec = BackendSpec("llama.cpp", str(folder), "geochat")
        with create_backend(spec) as local:
            inprocess = per_tile(local, tiles, args.tokens)
        started = time.perf_counter()
        child = SubprocessBackend(spec, RuntimeSettings(python=sys.executable))
        child.load()
        startup = time.perf_counter() - started
        try:
            subprocess_ = per_tile(child, tiles, args.tokens)
        finally:
            child.close()
    print(f"tiles: {args.tiles} x 504 px, {args.tokens} new tokens each (tiny GeoChat GGUF)")
    print(f"in-process llama.cpp: {inprocess * 1000:.1f} ms/tile")
    print(f"subprocess runtime:   {subprocess_ * 1000:.1f} ms/tile "
          f"(child start + load {startup:.2f} s, once)")
    print(f"ratio subprocess / in-process: {subprocess_ / inprocess:.2f}x "
          f"(+{(subprocess_ - inprocess) * 1000:.1f} ms/tile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
