"""Benchmark: the memory of ``python -m geochat_qgis tiles`` against raw rasterio windowed reads.

Issue 15 (6): ``tiles`` kept every tile image until the end (0.75 MB a 504 px tile). Its memory
must not grow with the number of tiles: goal, peak RSS < 400 MB for 10,000 tiles. Each run is
a fresh process that reports its own peak RSS (VmHWM; ru_maxrss on Linux keeps the
parent's peak across exec):

- ``tiles``: the command itself (PNGs and the footprint GeoPackage);
- raw: plain ``DatasetReader.read`` of the same windows, output size and resampling, each
  saved as PNG with PIL, nothing kept: the floor any tiler pays for the same work.

The raster is generated so that ``--tiles`` windows of 32 native pixels, upsampled to
``--tile-size`` with ``--gsd``, cover it exactly (3200 x 3200 px for 10,000 tiles). PNG
encoding dominates the time; at 504 px it is ~0.1 s a tile on the busy 2-core machine, so the
default is 128 px tiles (memory per image 48 KB: 10,000 of them held would be 480 MB).
Printed: tiles, seconds and peak RSS of each, and the ratios tiles / raw; ``--also N`` runs
the command a second time with N tiles to show RSS does not depend on the count.

    .venv/bin/python bench/tiles_memory.py [--tiles 10000] [--tile-size 128] [--also 1000]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 32  # native pixels per tile side
NATIVE_GSD = 1.0


def make_raster(path: Path, tiles: int) -> int:
    """A tiled, deflated RGB GeoTIFF that ``tiles`` windows of WINDOW px cover; its side."""
    import numpy as np
    import rasterio
    from affine import Affine

    side = math.ceil(math.sqrt(tiles)) * WINDOW
    y, x = np.mgrid[0:side, 0:side]
    data = np.stack([(x * 7 + y * 3) % 256, (x // 3 * y // 5) % 251, (x ^ y) % 256])
    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3,
                       dtype="uint8", crs="EPSG:32633", tiled=True, compress="deflate",
                       transform=Affine(NATIVE_GSD, 0, 500000, 0, -NATIVE_GSD, 4000000)) as ds:
        ds.write(data.astype("uint8"))
    return side


CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
mode, raster, out, tile, gsd, count = sys.argv[1:7]
tile, gsd, count = int(tile), float(gsd), int(count)
if mode == "tiles":
    import contextlib, io
    from geochat_qgis.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["tiles", raster, "--tile-size", str(tile), "--overlap", "0",
                     "--gsd", str(gsd), "--max-nodata", "1", "--out", out])
    assert code == 0, code
else:
    import os
    import numpy as np, rasterio
    from PIL import Image
    from rasterio.enums import Resampling
    from rasterio.windows import Window
    os.makedirs(out, exist_ok=True)
    window = int(sys.argv[7])
    with rasterio.open(raster) as ds:
        per_row = ds.width // window
        for k in range(count):
            row, col = divmod(k, per_row)
            data = ds.read([1, 2, 3], window=Window(col * window, row * window, window, window),
                           out_shape=(3, tile, tile), resampling=Resampling.bilinear)
            Image.fromarray(np.ascontiguousarray(data.transpose(1, 2, 0)), "RGB").save(
                f"{out}/r{row}_c{col}.png", format="PNG")
# VmHWM is this process image's own peak; ru_maxrss would carry the parent's peak across exec
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak = int(hwm[0]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": time.perf_counter() - start, "rss_mb": peak / 1024}))
"""


def run(mode: str, raster: Path, out: Path, tile: int, count: int) -> dict:
    gsd = NATIVE_GSD * WINDOW / tile
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(raster), str(out), str(tile),
                           str(gsd), str(count), str(WINDOW)], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["files"] = len(list(out.rglob("*.png")))
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=10_000)
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--also", type=int, default=1_000,
                        help="a second tiles run with this many tiles (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="geochat-bench-") as folder:
        work = Path(folder)
        rows = []
        for count in [args.tiles] + ([args.also] if args.also else []):
            raster = work / f"r{count}.tif"
            side = make_raster(raster, count)
            tiles = run("tiles", raster, work / "tiles", args.tile_size, count)
            raw = run("raw", raster, work / "raw", args.tile_size,
                      (side // WINDOW) ** 2)
            rows.append((count, tiles, raw))
    print(f"{'tiles':>7} {'size':>5} | {'tiles s':>8} {'raw s':>7} {'ratio':>5} | "
          f"{'tiles RSS':>9} {'raw RSS':>8} {'ratio':>5}")
    for _count, tiles, raw in rows:
        print(f"{tiles['files']:>7} {args.tile_size:>5} | {tiles['seconds']:>8.1f} "
              f"{raw['seconds']:>7.1f} {tiles['seconds'] / raw['seconds']:>5.2f} | "
              f"{tiles['rss_mb']:>6.0f} MB {raw['rss_mb']:>5.0f} MB "
              f"{tiles['rss_mb'] / raw['rss_mb']:>5.2f}")
    peak = rows[0][1]["rss_mb"]
    print(f"goal: peak RSS < 400 MB for {rows[0][1]['files']} tiles: "
          f"{'met' if peak < 400 else 'MISSED'} ({peak:.0f} MB)")


if __name__ == "__main__":
    main()
