"""Benchmark: the tiler against raw rasterio windowed reads of the same windows, same run.

The raster: 20000 x 20000, 4-band uint16 (R, G, B, NIR), 512 px tiled, deflate (predictor 2),
internal average overviews, made once into bench/.cache/ (a few minutes on 2 cores). Every
504 px tile at 10 % overlap is read twice per setting, alternating, in fresh processes: by
``iter_tiles`` (8-bit RGB with the job's stretch, nodata check, padding) and by plain
``DatasetReader.read`` of the same three bands, windows, output shape and resampling. Reported:
tiles/s of each (best of the repeats) and their ratio (goal >= 0.9), CPU time per tile (both
threads of the tiler; steadier than wall time on a busy machine) and each process's peak RSS
(goal < 400 MB), at native GSD and at twice the native GSD (overviews, average resampling).

    .venv/bin/python bench/tiling.py [--size 20000] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"
sys.path.insert(0, str(ROOT))

TILE, OVERLAP = 504, 0.1
NATIVE_GSD = 0.5  # metres per pixel of the generated raster (UTM, near the central meridian)
STRIP = 512  # rows generated and written at once


def make_raster(path: Path, size: int) -> None:
    """Write the benchmark raster (smooth fields plus texture, like imagery) atomically."""
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.enums import ColorInterp, Resampling

    temp = path.with_name(f".{path.name}.partial")
    profile = dict(driver="GTiff", width=size, height=size, count=4, dtype="uint16",
                   crs="EPSG:32633", transform=Affine(NATIVE_GSD, 0, 480000, 0, -NATIVE_GSD,
                                                      5_100_000),
                   tiled=True, blockxsize=512, blockysize=512, compress="deflate", zlevel=1,
                   predictor=2, interleave="pixel", bigtiff="IF_SAFER", num_threads="ALL_CPUS")
    rng = np.random.default_rng(42)
    cols = np.arange(size)
    col_fields = [(np.sin(cols / (300 + 70 * b)) * 6000 + 12000).astype(np.int32)
                  for b in range(4)]
    started = time.perf_counter()
    with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"), rasterio.open(temp, "w", **profile) as dst:
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue,
                           ColorInterp.undefined]
        for row0 in range(0, size, STRIP):
            rows = np.arange(row0, min(row0 + STRIP, size))
            strip = np.empty((4, len(rows), size), dtype=np.uint16)
            for b in range(4):
                row_field = (np.cos(rows / (500 + 90 * b)) * 5000).astype(np.int32)
                texture = rng.integers(0, 1024, size=(len(rows), size), dtype=np.int32)
                strip[b] = row_field[:, None] + col_fields[b][None, :] + texture
            dst.write(strip, window=((row0, row0 + len(rows)), (0, size)))
            print(f"\rwriting {path.name}: {row0 + len(rows)}/{size} rows", end="", flush=True)
        print(f"\nbuilding overviews ({time.perf_counter() - started:.0f} s so far)", flush=True)
        dst.build_overviews([2, 4, 8, 16, 32], Resampling.average)
    os.replace(temp, path)
    print(f"made {path} ({path.stat().st_size / 2**30:.2f} GiB) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)


def worker(mode: str, path: str, gsd_factor: float) -> dict:
    """One timed pass in this process: 'tiler' or 'raw'. Returns tiles, seconds, peak RSS."""
    from geochat_qgis.core.raster import RasterReader, limit_gdal_cache
    from geochat_qgis.core.tile_reading import iter_tiles
    from geochat_qgis.core.tiling import TileSpec, plan_tiles

    plan = plan_tiles(path, TileSpec(tile_size=TILE, overlap=OVERLAP))
    if gsd_factor != 1:  # not timed: both modes read the windows the plan lists
        spec = TileSpec(tile_size=TILE, overlap=OVERLAP, gsd=gsd_factor * plan.native_gsd_m)
        plan = plan_tiles(path, spec)
    with RasterReader(path) as reader:  # raw reads get the block cache the tiler sets itself
        limit_gdal_cache(reader.cache_bytes(plan.area_window[2], plan.window_px, plan.scale))
    started, cpu_started = time.perf_counter(), time.process_time()
    count = 0
    if mode == "tiler":
        for tile in iter_tiles(plan):
            count += tile.image is not None
    else:
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        resampling = Resampling.nearest if plan.scale == 1 else Resampling.average
        with rasterio.open(path) as ds:
            for tile in plan.tiles:
                window = Window(tile.col_off, tile.row_off, tile.width, tile.height)
                data = ds.read(list(plan.bands), window=window, out_shape=(3, TILE, TILE),
                               resampling=resampling)
                count += data.shape == (3, TILE, TILE)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"mode": mode, "tiles": count, "planned": len(plan), "seconds": seconds, "cpu": cpu,
            "window_px": plan.window_px,
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the
    parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(mode: str, path: Path, gsd_factor: float) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", mode, "--path", str(path),
                           "--gsd-factor", str(gsd_factor)], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        sys.exit(f"{mode} worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000, help="raster side in pixels")
    parser.add_argument("--repeat", type=int, default=2, help="passes per mode and setting")
    parser.add_argument("--worker", choices=["tiler", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--gsd-factor", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.gsd_factor)))
        return
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"bench_{args.size}_u16x4_deflate.tif"
    if not path.exists():
        make_raster(path, args.size)
    for factor in (1.0, 2.0):
        runs = {"raw": [], "tiler": []}
        for _ in range(args.repeat):
            for mode in ("raw", "tiler"):
                runs[mode].append(run_worker(mode, path, factor))
        rate = {m: max(x["tiles"] / x["seconds"] for x in r) for m, r in runs.items()}
        cpu = {m: min(x["cpu"] / x["tiles"] for x in r) * 1000 for m, r in runs.items()}
        rss = {m: max(x["peak_rss_mb"] for x in r) for m, r in runs.items()}
        tiles, window = runs["tiler"][0]["tiles"], runs["tiler"][0]["window_px"]
        print(f"GSD x{factor:g} ({window} native px per {TILE} px tile, {tiles} tiles): "
              f"tiler {rate['tiler']:.1f} tiles/s, raw rasterio {rate['raw']:.1f} tiles/s, "
              f"ratio {rate['tiler'] / rate['raw']:.2f} (goal >= 0.9); CPU per tile tiler "
              f"{cpu['tiler']:.1f} ms, raw {cpu['raw']:.1f} ms (ratio {cpu['raw'] / cpu['tiler']:.2f}); "
              f"peak RSS tiler {rss['tiler']:.0f} MB, raw {rss['raw']:.0f} MB (goal < 400 MB)",
              flush=True)

if __name__ == "__main__":
    main()
