"""Every write error of every format fails the export and keeps the old file (issue 15: 1, 5)."""
from __future__ import annotations

import os
import subprocess

import hostile
import pyogrio
import pytest
import shapely

from geochat_qgis.core.errors import ExportError
from geochat_qgis.core.export import check_output, export_detections
from geochat_qgis.core.results import Detection

full_disk = hostile.full_disk
mount_tmpfs = hostile.mount_tmpfs

UTM = "EPSG:32618"


def _dets(count: int) -> list[Detection]:
    return [Detection("car", shapely.box(500000 + i, 4000000, 500001 + i, 4000001),
                      phrase="a parked car " * 3, frame="raster", crs=UTM,
                      attributes={"prompt": "car " * 40}) for i in range(count)]


@pytest.mark.parametrize("suffix", [".shp", ".gpkg", ".geojson"])
def test_a_full_disk_fails_the_write_and_keeps_the_old_file(full_disk, suffix):
    path = export_detections(_dets(20), full_disk.path / f"cars{suffix}")
    before = full_disk.files()
    full_disk.fill()
    with pytest.raises(ExportError, match="disk is full"):
        export_detections(_dets(600), path)
    assert full_disk.files() == before  # old layer intact, no partial or backup file left
    full_disk.free()
    assert pyogrio.read_info(path)["features"] == 20


def test_a_full_disk_while_a_shapefile_is_written_keeps_the_old_one(full_disk):
    """The disk fills up part way through (the new file is larger than the space left)."""
    path = export_detections(_dets(20), full_disk.path / "cars.shp")
    before = full_disk.files()
    with (full_disk.path / ".filler").open("wb") as out:  # leave ~40 KB
        out.write(b"\0" * (os.statvfs(full_disk.path).f_bavail * os.statvfs(full_disk.path).f_frsize
                           - 40_000))
    with pytest.raises(ExportError, match="could not write .*cars.shp"):
        export_detections(_dets(2000), path)
    assert full_disk.files() == before


def test_the_output_is_checked_before_any_work(tmp_path):
    with pytest.raises(ExportError, match=r"cars\.xyz.*\.shp, \.gpkg or \.geojson"):
        check_output(tmp_path / "cars.xyz")
    with pytest.raises(ExportError, match="folder .*missing does not exist"):
        check_output(tmp_path / "missing" / "cars.gpkg")
    (tmp_path / "notes.gpkg").write_text("just text")
    with pytest.raises(ExportError, match="not a readable GeoPackage"):
        check_output(tmp_path / "notes.gpkg")
    assert check_output(tmp_path / "cars.gpkg") == tmp_path / "cars.gpkg"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gpkg"]  # no probe left


def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "ro"
    mount_tmpfs(folder, "64k")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        with pytest.raises(ExportError, match="not writable.*Choose a folder"):
            check_output(folder / "cars.shp")
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
