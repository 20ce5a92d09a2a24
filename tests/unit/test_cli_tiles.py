"""``python -m geochat_qgis tiles``: real files in, PNGs and a GeoPackage out."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
from PIL import Image

from geochat_qgis.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file())


def test_tiles_writes_pngs_and_footprints(demo_raster, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["tiles", str(demo_raster), "--tile-size", "336", "--overlap", "0.1",
                 "--out", str(out)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert summary == [f"16 tiles written to {out / 'tiles'}, 0 skipped (over 95% nodata), "
                       "0 failed"]
    pngs = sorted((out / "tiles").glob("*.png"))
    assert len(pngs) == 16 and _outputs(out) == sorted(pngs + [out / "tiles.gpkg"])
    for png in pngs:
        with Image.open(png) as image:
            assert image.mode == "RGB" and image.size == (336, 336)
    info = pyogrio.read_info(out / "tiles.gpkg")
    assert info["features"] == 16 and info["crs"] == "EPSG:3857"
    assert list(info["fields"]) == ["tile_id", "row", "col", "col_off", "row_off", "width",
                                    "height", "gsd_m", "nodata_frac"]
    meta, _, geometry, fields = pyogrio.raw.read(out / "tiles.gpkg")
    names = list(meta["fields"])
    ids = fields[names.index("tile_id")]
    assert sorted(f"{i}.png" for i in ids) == [p.name for p in pngs]
    assert set(fields[names.index("width")]) == {336}


def test_tiles_pixel_space_bands_and_gsd(data_dir, tmp_path, capsys):
    out = tmp_path / "rot"
    assert main(["tiles", str(data_dir / "rotated.tif"), "--pixel-space", "--tile-size", "28",
                 "--max-nodata", "1", "--out", str(out)]) == 0
    assert pyogrio.read_info(out / "tiles.gpkg")["crs"] is None
    out = tmp_path / "grey"
    assert main(["tiles", str(data_dir / "RGBA.uint16.tif"), "--bands", "1", "--gsd", "2.76",
                 "--tile-size", "112", "--out", str(out)]) == 0
    for png in (out / "tiles").glob("*.png"):
        with Image.open(png) as image:
            colours = set(map(tuple, np.asarray(image).reshape(-1, 3).tolist()))
        # one constant band repeated as grey, or the pad colour where alpha is 0
        assert colours <= {(128, 128, 128), (122, 116, 104)} and (128, 128, 128) in colours
    meta, _, _, fields = pyogrio.raw.read(out / "tiles.gpkg")
    gsd = fields[list(meta["fields"]).index("gsd_m")]
    assert np.allclose(gsd, 2.76, rtol=0.02)


@pytest.mark.parametrize("name, args, message", [
    ("all-nodata.tif", [], "No tile written"),
    ("rotated.tif", [], "no CRS"),
    ("missing.tif", [], "not found"),
    ("cogeo.tif", ["--bands", "1,2,9"], "Band 9 does not exist"),
    ("cogeo.tif", ["--extent", "0,0,1,1", "--extent-crs", "EPSG:4326"], "misses the raster"),
])
def test_bad_input_exits_non_zero_and_writes_nothing(data_dir, tmp_path, capsys, name, args,
                                                     message):
    out = tmp_path / "out"
    assert main(["tiles", str(data_dir / name), *args, "--out", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_corrupt_blocks_fail_their_tiles_and_the_job_goes_on(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["tiles", str(data_dir / "corrupt.tif"), "--tile-size", "256", "--overlap",
                 "0", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    written, failed = int(captured.out.split()[0]), int(captured.out.split(", ")[-1].split()[0])
    assert written > 0 and failed > 0 and written + failed == 16
    assert captured.err.count("failed: r") == failed
    pngs = list((out / "tiles").glob("*.png"))
    assert len(pngs) == written and not list(out.rglob(".*partial*"))
    assert pyogrio.read_info(out / "tiles.gpkg")["features"] == written


def test_bad_extent_syntax_is_an_argparse_error(demo_raster, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tiles", str(demo_raster), "--extent", "1,2,3", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "give 4 comma-separated numbers" in capsys.readouterr().err


def test_module_entry_point_prints_one_line(demo_raster, tmp_path):
    done = subprocess.run([sys.executable, "-m", "geochat_qgis", "tiles", str(demo_raster),
                           "--tile-size", "504", "--gsd", "1.0", "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("1 tiles written")
    assert done.stderr == ""


def test_aoi_file_limits_the_tiles(demo_raster, tmp_path, capsys):
    import shapely
    from shapely.geometry import box

    aoi = tmp_path / "aoi.geojson"
    corner = box(14321853.2, 4533021.5 - 100, 14321853.2 + 100, 4533021.5)  # top-left 100 m
    pyogrio.raw.write(str(aoi), shapely.to_wkb(np.array([corner], dtype=object)), [], [],
                      driver="GeoJSON", geometry_type="Polygon", crs="EPSG:3857")
    out = tmp_path / "out"
    assert main(["tiles", str(demo_raster), "--aoi", str(aoi), "--tile-size", "256",
                 "--overlap", "0", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "tiles").glob("*.png")) == ["r0_c0.png"]


def test_negative_extent_in_another_crs(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["tiles", str(data_dir / "goes.tif"), "--extent=-180,-90,180,90",
                 "--extent-crs", "EPSG:4326", "--tile-size", "271", "--overlap", "0",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("4 tiles written")
