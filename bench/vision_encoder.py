"""GeoChat's image encoder: the project's (core/vision) against libmtmd, seconds per tile.

CLIP ViT-L/14-336 dimensions at 504 px (GeoChat's tower: 1297 positions, 23 layers run, 1024
wide, 16 heads, MLP 4096) and the mlp2x_gelu projector to 4096, random weights in float16 as the
converter writes a float16 GeoChat's mmproj (``tiny_gguf.VIT_L_504``). Both encode the same
504 px tiles in the same process with the same thread count; the modes alternate and the best of
``--repeats`` counts. libmtmd needs a text model to attach the projector to: a one-layer Llama of
width 4096. On a machine with torch+CUDA the project's torch path is timed too (``--gpu``).
Goal: project / libmtmd <= 1.2 on the CPU.

    python bench/vision_encoder.py [--tiles 2] [--repeats 2] [--threads 2] [--gpu]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / ".cache" / "vision_encoder"


def inputs() -> tuple[Path, Path]:
    """(mmproj, text model), written once into the cache."""
    from geochat_qgis.core.vision.tiny_gguf import VIT_L_504, LlamaDims, write_llama_gguf, write_mlp_mmproj

    CACHE.mkdir(parents=True, exist_ok=True)
    mmproj, text = CACHE / "mmproj-vit-l-504-f16.gguf", CACHE / "text-4096.gguf"
    if not mmproj.exists():
        write_mlp_mmproj(mmproj.with_suffix(".tmp"), 4096, VIT_L_504, seed=0, half=True)
        mmproj.with_suffix(".tmp").replace(mmproj)
    if not text.exists():
        write_llama_gguf(text, LlamaDims(n_embd=4096, layers=1, ff=256, heads=32, kv_heads=32))
    return mmproj, text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--gpu", action="store_true", help="also time the torch path on CUDA")
    parser.add_argument("--no-libmtmd", action="store_true",
                        help="time the project's encoder only (a machine without llama.cpp: "
                             "bench/gpu_suite.sh)")
    args = parser.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    import numpy as np

    from geochat_qgis.core.vision.encoder import ImageEncoder

    mmproj, text = inputs()
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (504, 504, 3), dtype=np.uint8) for _ in range(args.tiles)]
    encoder = ImageEncoder(mmproj, device="cpu")
    modes = {"project": lambda tile: encoder.encode_pixels(encoder.pixels(tile))}
    load_mtmd = None
    if not args.no_libmtmd:
        import llama_cpp

        from geochat_qgis.core.llama_library import route_mtmd_logs
        from geochat_qgis.core.vision.libmtmd import MtmdEncoder

        route_mtmd_logs()
        llama = llama_cpp.Llama(str(text), n_ctx=256, n_threads=args.threads, verbose=False)
        start = time.perf_counter()
        mtmd = MtmdEncoder(llama.model, mmproj, 4096, n_threads=args.threads)
        load_mtmd = time.perf_counter() - start  # not timed below: both are loaded once
        modes["libmtmd"] = mtmd.embed
    if args.gpu:
        gpu = ImageEncoder(mmproj, device="cuda")
        modes["project-cuda"] = lambda tile: gpu.encode_pixels(gpu.pixels(tile))
        modes["project-cuda"](tiles[0])  # warm CUDA
    best: dict[str, float] = {}
    cpu_best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, run in modes.items():
            start, cpu = time.perf_counter(), time.process_time()
            for tile in tiles:
                run(tile)
            seconds = (time.perf_counter() - start) / len(tiles)
            cpu_best[name] = min(cpu_best.get(name, float("inf")),
                                 (time.process_time() - cpu) / len(tiles))
            best[name] = min(best.get(name, float("inf")), seconds)
            print(f"{name}: {seconds:.2f} s per tile", flush=True)
    figures = {f"{name}_s_per_tile": round(value, 3) for name, value in best.items()}
    figures.update({f"{name}_cpu_s_per_tile": round(v, 3) for name, v in cpu_best.items()})
    if load_mtmd is not None:
        figures["libmtmd_load_s"] = round(load_mtmd, 3)
        figures["project_over_libmtmd"] = round(best["project"] / best["libmtmd"], 3)
    if "project-cuda" in best:
        figures["cpu_over_cuda"] = round(best["project"] / best["project-cuda"], 1)
    figures["threads"] = args.threads
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
