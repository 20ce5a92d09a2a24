"""What ``detect`` adds on top of llama.cpp: end to end against raw llama-cpp-python, same tiles.

Tiny random GeoChat GGUF, 50 tiles of 504 px (a 5040 x 2520 raster made from the demo image),
``[refer]`` prompt, the box grammar, greedy decoding. In the same process and run:

- raw: ``Llama`` + ``Llava15ChatHandler`` (the documented multimodal path), one
  ``create_chat_completion`` per tile with the tile as a PNG data URI (encoded beforehand, not
  timed), the same grammar and sampling;
- detect: ``python -m geochat_qgis detect`` called in process (tiling, backend, parsing,
  georeferencing, merging, GeoPackage export).

Both include loading the model. Imports are warmed first; runs alternate and the best of
``--repeats`` is kept, for wall time and for this process's CPU time (all its threads): on a
shared machine the wall time swings with other people's load, the CPU time much less.
Goal: detect / raw <= 1.05.

    python bench/backend_overhead.py [--tiles-x 10 --tiles-y 5] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / ".cache" / "backend_overhead"
TILE = 504
PHRASE = "car"


def tiny_model() -> Path:
    """The tiny GeoChat GGUF folder (built once into the cache)."""
    from geochat_qgis.core.weights.tiny import build_tiny_geochat

    folder = CACHE / "tiny-gguf"
    if not (folder / "model.gguf").is_file():
        build_tiny_geochat(folder, "gguf")
    return folder


def bench_raster(tiles_x: int, tiles_y: int) -> Path:
    """A GeoTIFF of exactly tiles_x x tiles_y tiles, the demo image repeated, its georeference."""
    import rasterio

    path = CACHE / f"raster-{tiles_x}x{tiles_y}.tif"
    if path.is_file():
        return path
    with rasterio.open(ROOT / "tests" / "data" / "cogeo.tif") as src:
        image, profile = src.read(), src.profile
    width, height = tiles_x * TILE, tiles_y * TILE
    reps = (1, -(-height // image.shape[1]), -(-width // image.shape[2]))
    data = np.tile(image, reps)[:, :height, :width]
    profile.update(width=width, height=height, tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", driver="GTiff", photometric="RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.tif")
    with rasterio.open(partial, "w", **profile) as dst:
        dst.write(data)
    os.replace(partial, path)
    return path


def tile_images(raster: Path) -> list[np.ndarray]:
    """The tiles detect will see (the same tiler), read beforehand for the raw run."""
    from geochat_qgis.core.tile_reading import iter_tiles
    from geochat_qgis.core.tiling import TileSpec, plan_tiles

    plan = plan_tiles(raster, TileSpec(tile_size=TILE, overlap=0.0))
    return [tile.image for tile in iter_tiles(plan)]


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def run_raw(model: Path, uris: list[str], question: str, max_tokens: int) -> int:
    """Generated tokens of raw llama-cpp-python over every tile."""
    from llama_cpp import Llama, LlamaGrammar
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    from geochat_qgis.core.backends.grammar import REFER_GRAMMAR
    from geochat_qgis.core.families.llava_v1 import SYSTEM

    handler = Llava15ChatHandler(clip_model_path=str(model / "mmproj.gguf"), verbose=False)
    llama = Llama(str(model / "model.gguf"), chat_handler=handler, n_ctx=2048, verbose=False)
    grammar = LlamaGrammar.from_string(REFER_GRAMMAR, verbose=False)
    tokens = 0
    for uri in uris:
        answer = llama.create_chat_completion(
            messages=[{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                   {"type": "text", "text": question}]}],
            temperature=0.0, repeat_penalty=1.0, max_tokens=max_tokens, grammar=grammar)
        tokens += answer["usage"]["completion_tokens"]
    llama.close()
    return tokens


def run_detect(model: Path, raster: Path, out: Path, max_tokens: int) -> str:
    """The summary line of ``detect`` end to end, in process."""
    import contextlib
    import io

    from geochat_qgis.cli import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["detect", str(raster), "--model", str(model), "--task", "refer",
                     "--prompt", PHRASE, "--overlap", "0", "--grammar", "--max-new-tokens",
                     str(max_tokens), "--quiet", "-o", str(out)])
    if code != 0:
        raise SystemExit(f"detect failed ({code}): {stdout.getvalue()}")
    return stdout.getvalue().strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles-x", type=int, default=10)
    parser.add_argument("--tiles-y", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from geochat_qgis.core.backends.images import png_data_uri
    from geochat_qgis.core.families import get_family

    model = tiny_model()
    raster = bench_raster(args.tiles_x, args.tiles_y)
    images = tile_images(raster)
    uris = [png_data_uri(image) for image in images]
    question = get_family("geochat").build_prompt("refer", PHRASE)
    import geopandas  # noqa: F401  (warm the imports detect's export uses)
    import pyogrio  # noqa: F401

    from geochat_qgis.core.llama_library import route_mtmd_logs

    route_mtmd_logs()  # libmtmd's per-image logs quiet for both runs

    clocks: dict[str, list[Clock]] = {"raw": [], "detect": []}
    raw_tokens, summary = 0, ""
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        for repeat in range(args.repeats):
            for name in ("raw", "detect") if repeat % 2 == 0 else ("detect", "raw"):
                with Clock() as clock:
                    if name == "raw":
                        raw_tokens = run_raw(model, uris, question, args.max_new_tokens)
                    else:
                        summary = run_detect(model, raster, Path(tmp) / f"d{repeat}.gpkg",
                                             args.max_new_tokens)
                clocks[name].append(clock)
                print(f"  run {repeat + 1} {name}: {clock.wall:.2f} s wall, {clock.cpu:.2f} s CPU",
                      flush=True)
    best = {name: (min(c.wall for c in runs), min(c.cpu for c in runs))
            for name, runs in clocks.items()}
    print(f"tiles: {len(images)} of {TILE} px; raw generated tokens: {raw_tokens}")
    print(f"detect summary: {summary}")
    for name, label in (("raw", "raw llama-cpp-python"), ("detect", "detect end to end")):
        wall, cpu = best[name]
        print(f"{label:22s} best wall {wall:6.2f} s ({len(images) / wall * 60:.0f} tiles/min), "
              f"best CPU {cpu:6.2f} s")
    print(f"ratio detect / raw: wall {best['detect'][0] / best['raw'][0]:.3f}, "
          f"CPU {best['detect'][1] / best['raw'][1]:.3f} (goal <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
