"""detect and tiles as a careful user and a hostile server meet them (issue 15): a clear message
and exit status for every bad input, results so far kept, an old output replaced only by a
complete newer one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hostile
import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine

from geochat_qgis.cli import main

ROOT = Path(__file__).resolve().parents[2]
full_disk = hostile.full_disk
BOXES = "<p>car</p> {<10><10><40><40>|<0>} <p>car</p> {<60><60><90><90>|<0>}"


def detect(server, raster, out, *extra) -> list[str]:
    return ["detect", str(raster), "--model", "geochat", "--server-url", server.url,
            "--prompt", "car", "--tile-size", "256", "--overlap", "0", "--max-in-flight", "1",
            "--quiet", "-o", str(out), *extra]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def old_output(tmp_path, data_dir):
    """A finished run's cars.shp to protect."""
    with hostile.HostileServer("ok", text=BOXES) as server:
        assert main(detect(server, data_dir / "RGB.byte.tif", tmp_path / "cars.shp")) == 0
    before = files(tmp_path)
    assert pyogrio.read_info(tmp_path / "cars.shp")["features"] > 0
    return tmp_path / "cars.shp", before


@pytest.mark.parametrize("mode", ["500", "garbage", "cut-length", "cut-chunked"])
def test_a_run_where_every_tile_failed_keeps_the_old_output(old_output, data_dir, capsys, mode):
    path, before = old_output
    with hostile.HostileServer(mode) as server:
        code = main(detect(server, data_dir / "RGB.byte.tif", path))
    out, err = capsys.readouterr()
    assert code == 1
    assert "tiles: 0 done" in out and "failed of 12" in out and "output: none" in out
    assert f"{path} was kept" in err and "Traceback" not in err
    assert files(path.parent) == before


def test_a_run_that_fails_part_way_writes_beside_the_old_output(old_output, data_dir, capsys):
    path, before = old_output
    with hostile.HostileServer("ok", text=BOXES) as server:
        server.fail_from = 4  # the server dies after four tiles: three failures in a row stop
        code = main(detect(server, data_dir / "RGB.byte.tif", path))
    out, err = capsys.readouterr()
    assert code == 1 and "tiles: 4 done" in out and "HTTP 500" in err
    partial = [p for p in path.parent.glob("cars-partial-*.shp")]
    assert len(partial) == 1 and pyogrio.read_info(partial[0])["features"] > 0
    assert f"written to {partial[0].name}" in err and "cars.shp was kept" in err
    assert {k: v for k, v in files(path.parent).items() if "partial" not in k} == before


def test_one_failed_request_of_a_batch_costs_no_answered_tile(tmp_path, data_dir, capsys):
    """Four tiles in flight, one tile the server always fails (HTTP 500, retries too): the
    batch is asked again tile by tile, so only that tile is lost, not the three answered ones."""
    out = tmp_path / "cars.gpkg"
    with hostile.HostileServer("ok", text=BOXES) as server:
        server.fail_image = 1
        args = detect(server, data_dir / "RGB.byte.tif", out)
        args[args.index("--max-in-flight") + 1] = "4"
        code = main(args)
        requests = server.requests
    stdout, _err = capsys.readouterr()
    assert "tiles: 11 done" in stdout and "1 failed of 12" in stdout, stdout
    assert requests > 12 + 3  # the failed batch asked again, a request per tile
    assert code == 1  # tiles failed: the exit status says so (one rule, see --help)
    partial = list(tmp_path.glob("cars*.gpkg"))
    assert len(partial) == 1 and pyogrio.read_info(partial[0])["features"] > 0


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_writes_the_finished_tiles(tmp_path, data_dir, signum, status):
    out = tmp_path / "cars.gpkg"
    with hostile.HostileServer("ok", text=BOXES) as server:
        server.delay = 0.3
        child = subprocess.Popen([sys.executable, "-m", "geochat_qgis",
                                  *detect(server, data_dir / "RGB.byte.tif", out)],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        deadline = time.monotonic() + 60
        while server.requests < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signum)
        stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == status, stderr
    assert "Traceback" not in stderr and "finished tiles were written" in stderr
    done = int(stdout.split("tiles: ")[1].split(" done")[0])
    assert 2 <= done < 12
    assert pyogrio.read_info(out)["features"] == 2 * done  # two boxes a tile, none overlap


@pytest.mark.parametrize("name, make, message", [
    ("cars.xyz", None, r"cars\.xyz: use a \.shp, \.gpkg or \.geojson"),
    ("missing/cars.shp", None, "folder .*missing does not exist"),
    ("notes.gpkg", lambda p: p.write_text("my notes"), "not a readable GeoPackage"),
])
def test_a_bad_output_fails_before_the_first_tile(tmp_path, data_dir, capsys, name, make,
                                                  message):
    path = tmp_path / name
    if make:
        make(path)
    with hostile.HostileServer("ok") as server:
        assert main(detect(server, data_dir / "RGB.byte.tif", path)) == 1
        assert server.requests == 0
    assert capsys.readouterr().err.startswith("error: ")
    if make:
        assert path.read_text() == "my notes"


def test_a_read_only_output_folder_fails_before_the_first_tile(tmp_path, data_dir, capsys):
    folder = tmp_path / "ro"
    hostile.mount_tmpfs(folder, "64k")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        with hostile.HostileServer("ok") as server:
            assert main(detect(server, data_dir / "RGB.byte.tif", folder / "cars.shp")) == 1
            assert server.requests == 0
        assert "not writable" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("extra, message", [
    (["--extent-crs", "EPSG:999999", "--extent", "0,0,1,1"], "extent CRS.*'EPSG:999999'"),
    (["--output-crs", "EPSG:999999"], "output CRS.*'EPSG:999999'"),
    (["--extent=-inf,-inf,inf,inf"], "four finite numbers"),
])
def test_bad_crs_and_infinite_extents_are_named_before_any_tile(tmp_path, data_dir, capsys,
                                                                extra, message):
    with hostile.HostileServer("ok") as server:
        try:
            code = main(detect(server, data_dir / "RGB.byte.tif", tmp_path / "c.gpkg", *extra))
        except SystemExit as stop:  # argparse: a usage error
            code = stop.code
        assert server.requests == 0
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_boxes_that_do_not_exist_in_the_output_crs_are_dropped_and_said(tmp_path, data_dir,
                                                                       capsys):
    """goes.tif is a geostationary disc: a box in a corner is off the globe in EPSG:4326."""
    text = "<p>space</p> {<0><0><4><4>|<0>} <p>cloud</p> {<45><45><55><55>|<0>}"
    out = tmp_path / "goes.gpkg"
    with hostile.HostileServer("ok", text=text) as server:
        code = main(detect(server, data_dir / "goes.tif", out, "--tile-size", "271",
                           "--output-crs", "EPSG:4326"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "tiles: 4 done" in captured.out
    # the top-left corner of three tiles is off the disc; the fourth's is its centre
    assert "3 box(es) left out" in captured.err and "EPSG:4326" in captured.err
    labels = list(pyogrio.read_dataframe(out)["label"])
    assert sorted(labels) == ["cloud"] * 4 + ["space"]


def test_negative_extents_parse_as_typed(tmp_path, capsys):
    path = tmp_path / "nc.tif"
    with rasterio.open(path, "w", driver="GTiff", width=300, height=200, count=3,
                       dtype="uint8", crs="EPSG:4326",
                       transform=Affine(0.002, 0, -79.0, 0, -0.002, 36.0)) as ds:
        ds.write(np.full((3, 200, 300), 90, np.uint8))
    assert main(["tiles", str(path), "--extent", "-78.9,35.7,-78.6,35.9", "--tile-size", "64",
                 "--out", str(tmp_path / "out")]) == 0
    assert "tiles written" in capsys.readouterr().out


@pytest.mark.parametrize("argument", ["--max-new-tokens=-5", "--max-new-tokens=0",
                                      "--iou=1.5", "--temperature=-1", "--tile-size=0"])
def test_impossible_numbers_are_refused(tmp_path, capsys, argument):
    with pytest.raises(SystemExit) as stop:
        main(["detect", "x.tif", "--model", "m", "--prompt", "car", "-o",
              str(tmp_path / "o.gpkg"), argument])
    assert stop.value.code == 2
    assert "is not a" in capsys.readouterr().err


def test_tiles_interrupted_keeps_pngs_and_their_footprints(tmp_path, data_dir):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-m", "geochat_qgis", "tiles",
                              str(data_dir / "cogeo.tif"), "--tile-size", "32", "--overlap", "0",
                              "--out", str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list((out / "tiles").glob("*.png"))) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    pngs = {p.stem for p in (out / "tiles").glob("*.png")}
    assert 20 <= len(pngs) < 1024 and "Traceback" not in stderr
    _, _, _, columns = pyogrio.raw.read(out / "tiles.gpkg", columns=["tile_id"])
    assert set(columns[0]) == pngs
    assert not [p for p in out.rglob(".*")]  # no partial file left


def test_tiles_on_a_full_disk_says_so_and_keeps_what_fits(full_disk, data_dir):
    run = subprocess.run([sys.executable, "-m", "geochat_qgis", "tiles",
                          str(data_dir / "cogeo.tif"), "--tile-size", "128",
                          "--out", str(full_disk.path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 1
    assert "disk is full" in run.stderr and "Traceback" not in run.stderr
    assert not [p for p in full_disk.path.rglob(".*") if p != full_disk.filler]  # no partials


def test_tiles_into_a_read_only_folder_says_so(tmp_path, data_dir):
    folder = tmp_path / "ro"
    hostile.mount_tmpfs(folder, "64k")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        run = subprocess.run([sys.executable, "-m", "geochat_qgis", "tiles",
                              str(data_dir / "RGB.byte.tif"), "--out", str(folder / "t")],
                             cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
    assert run.returncode == 1
    assert "read-only" in run.stderr and "Traceback" not in run.stderr


def test_no_library_chatter_on_stderr(tmp_path, data_dir):
    """pyogrio's INFO lines and GDAL's warnings about another PROJ's database stay out."""
    env = {**os.environ, "PROJ_DATA": "/usr/share/proj", "PROJ_LIB": "/usr/share/proj"}
    run = subprocess.run([sys.executable, "-m", "geochat_qgis", "tiles",
                          str(data_dir / "RGB.byte.tif"), "--extent-crs", "EPSG:4326",
                          "--extent=-78,23.5,-77,24.5", "--out", str(tmp_path / "t")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert "INFO" not in run.stderr and "proj.db" not in run.stderr
