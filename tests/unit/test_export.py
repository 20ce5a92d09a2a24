"""Export round trips (Shapefile, GeoPackage, GeoJSON) and atomic writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import pytest
import shapely
from pyproj import CRS

from geochat_qgis.core.backends.base import CancelToken
from geochat_qgis.core.errors import Cancelled, ExportError
from geochat_qgis.core.export import FIELDS, _commit, export_detections
from geochat_qgis.core.results import Detection

UTM = "EPSG:32618"
LONG_PROMPT = "Décris chaque bâtiment " * 20  # 460 characters, over 254 bytes


def _dets():
    attrs = {"task": "grounding", "prompt": LONG_PROMPT, "model": "geochat-7b-q4"}
    obox = shapely.affinity.rotate(shapely.box(500000, 4000000, 500040, 4000010), 30)
    mask = shapely.Polygon(
        [(500100, 4000100), (500200, 4000100), (500200, 4000200), (500100, 4000200)],
        [[(500120, 4000120), (500140, 4000120), (500140, 4000140), (500120, 4000140)]],
    )
    two_parts = shapely.MultiPolygon([shapely.box(500300, 4000300, 500310, 4000310),
                                      shapely.box(500400, 4000400, 500410, 4000410)])
    return [
        Detection("avión", obox, kind="obox", phrase="the white avión", angle=30.0,
                  tile_id="r0_c1", frame="raster", crs=UTM, attributes=dict(attrs)),
        Detection("pond", mask, kind="mask", phrase="pond", flags=["clipped"], score=0.75,
                  tile_id="r1_c1", frame="raster", crs=UTM, attributes=dict(attrs)),
        Detection("field", two_parts, kind="mask", tile_id="r2_c0", frame="raster", crs=UTM),
    ]


PROVENANCE = {"raster": "RGB.byte.tif", "run_id": "run-42", "task": "refer"}


@pytest.mark.parametrize("suffix", [".shp", ".gpkg", ".geojson"])
def test_round_trip(tmp_path, suffix):
    path = export_detections(_dets(), tmp_path / f"found{suffix}", provenance=PROVENANCE)
    meta, _, geometry, columns = pyogrio.raw.read(path)
    fields = dict(zip(meta["fields"], columns))
    assert list(meta["fields"]) == [f.shp_name if suffix == ".shp" else f.name for f in FIELDS]
    assert CRS.from_user_input(meta["crs"]) == CRS.from_user_input(UTM)
    geoms = shapely.from_wkb(geometry)
    for got, det in zip(geoms, _dets()):
        assert got.symmetric_difference(det.geometry).area < 1e-3
    assert len(geoms[1].interiors if geoms[1].geom_type == "Polygon" else geoms[1].geoms[0].interiors) == 1
    assert list(fields["label"]) == ["avión", "pond", "field"]
    assert list(fields["task"]) == ["grounding", "grounding", "refer"]  # own, else provenance
    assert fields["angle"][0] == 30.0 and np.isnan(fields["angle"][1])
    assert fields["score"][1] == 0.75
    assert list(fields["tile_id"]) == ["r0_c1", "r1_c1", "r2_c0"]
    assert fields["raster"][2] == "RGB.byte.tif" and fields["run_id"][0] == "run-42"
    assert fields["flags"][1] == "clipped"
    created = str(fields["created"][0])  # GDAL reads GeoJSON's ISO text back as a datetime
    assert created[:2] == "20" and "T" in created
    if suffix == ".shp":
        assert fields["prompt"][0] == LONG_PROMPT.encode()[:254].decode("utf-8", "ignore")
        assert (tmp_path / "found.cpg").read_text().strip().upper() == "UTF-8"
        assert (tmp_path / "found.prj").exists()
        assert all(len(f.shp_name) <= 10 for f in FIELDS)
    else:
        assert fields["prompt"][0] == LONG_PROMPT  # full text where the format allows it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_reprojects_to_the_requested_crs(tmp_path):
    path = export_detections(_dets()[:1], tmp_path / "wgs.gpkg", crs="EPSG:4326", layer="hits")
    meta, _, geometry, _ = pyogrio.raw.read(path, layer="hits")
    assert CRS.from_user_input(meta["crs"]).to_epsg() == 4326
    lon, lat = shapely.from_wkb(geometry[0]).centroid.coords[0]
    assert -76 < lon < -74 and 36 < lat < 37  # 500 km E, 4000 km N in UTM 18N


def test_existing_geopackage_keeps_its_other_layers(tmp_path):
    path = tmp_path / "all.gpkg"
    export_detections(_dets(), path, layer="first")
    export_detections(_dets()[:1], path, layer="second")
    export_detections(_dets()[:2], path, layer="first")  # replaces that layer only
    layers = dict(pyogrio.list_layers(path))
    assert set(layers) == {"first", "second"}
    assert pyogrio.read_info(path, layer="first")["features"] == 2


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("suffix", [".shp", ".gpkg", ".geojson"])
def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, suffix):
    path = export_detections(_dets(), tmp_path / f"out{suffix}")
    before = _snapshot(tmp_path)
    broken = _dets()
    broken[2].label = "field \ud800"  # a lone surrogate: pyogrio fails part way through
    with pytest.raises(ExportError, match="could not write"):
        export_detections(broken, path)
    assert _snapshot(tmp_path) == before
    with pytest.raises(ExportError, match="unknown output CRS"):
        export_detections(_dets(), path, crs="NOT A CRS")
    assert _snapshot(tmp_path) == before


class CancelAfterWrite(CancelToken):
    """Cancelled on its second check: after the file was written, before it is put in place."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    @property
    def cancelled(self) -> bool:
        self.checks += 1
        return self.checks >= 2


@pytest.mark.parametrize("suffix", [".shp", ".gpkg"])
def test_cancelled_export_changes_nothing(tmp_path, suffix):
    path = export_detections(_dets()[:1], tmp_path / f"out{suffix}")
    before = _snapshot(tmp_path)
    token = CancelAfterWrite()
    with pytest.raises(Cancelled):
        export_detections(_dets(), path, cancel=token)
    assert token.checks == 2 and _snapshot(tmp_path) == before
    cancelled = CancelToken()
    cancelled.cancel()
    with pytest.raises(Cancelled):
        export_detections(_dets(), tmp_path / f"new{suffix}", cancel=cancelled)
    assert _snapshot(tmp_path) == before


def test_commit_restores_the_old_files_when_a_rename_fails(tmp_path):
    """Putting a shapefile's parts in place is all or nothing: a failed rename rolls back."""
    old = {name: f"old {name}".encode() for name in ("out.shp", "out.dbf", "out.qix")}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    new_shp, new_dbf = tmp_path / ".new.shp", tmp_path / ".new.dbf"
    new_shp.write_bytes(b"new shp")
    new_dbf.write_bytes(b"new dbf")
    moves = {tmp_path / "out.shp": new_shp, tmp_path / "gone" / "out.dbf": new_dbf}
    with pytest.raises(FileNotFoundError):  # the second rename has nowhere to go
        _commit(moves, [tmp_path / "out.qix"])
    assert {p.name: p.read_bytes() for p in tmp_path.glob("out.*")} == old
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # no backups left


def test_stale_shapefile_sidecars_are_replaced(tmp_path):
    path = export_detections(_dets(), tmp_path / "out.shp")
    (tmp_path / "out.qix").write_bytes(b"stale index")
    export_detections(_dets()[:1], path)
    assert not (tmp_path / "out.qix").exists()
    assert pyogrio.read_info(path)["features"] == 1


def test_refusals(tmp_path):
    with pytest.raises(ExportError, match=".shp, .gpkg or .geojson"):
        export_detections(_dets(), tmp_path / "out.csv")
    with pytest.raises(ExportError, match="does not exist"):
        export_detections(_dets(), tmp_path / "missing" / "out.gpkg")
    (tmp_path / "out.dbf").mkdir()
    with pytest.raises(ExportError, match="folder"):
        export_detections(_dets(), tmp_path / "out.shp")
    tile_frame = [Detection("x", shapely.box(0, 0, 1, 1))]
    with pytest.raises(ExportError, match="georeference"):
        export_detections(tile_frame, tmp_path / "out.gpkg")
    (tmp_path / "notes.gpkg").write_text("not a geopackage")
    with pytest.raises(ExportError, match="not a readable GeoPackage"):
        export_detections(_dets(), tmp_path / "notes.gpkg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gpkg", "out.dbf"]
    assert (tmp_path / "notes.gpkg").read_text() == "not a geopackage"


@pytest.mark.parametrize("suffix", [".shp", ".gpkg", ".geojson"])
def test_no_detections_write_an_empty_layer(tmp_path, suffix):
    path = export_detections([], tmp_path / f"none{suffix}", crs="EPSG:4326")
    info = pyogrio.read_info(path)
    assert info["features"] == 0 and info["crs"] == "EPSG:4326"
    if suffix != ".geojson":  # GeoJSON keeps no schema without features
        assert list(info["fields"]) == [f.shp_name if suffix == ".shp" else f.name for f in FIELDS]


def test_non_text_provenance_is_written_as_text(tmp_path):
    dets = _dets()[:2]
    dets[0].attributes["run_id"] = 7
    path = export_detections(dets, tmp_path / "p.gpkg", provenance={"model": Path("m.gguf")})
    _, _, _, columns = pyogrio.raw.read(path)
    fields = dict(zip(pyogrio.read_info(path)["fields"], columns))
    assert list(fields["run_id"]) == ["7", None]
    assert list(fields["model"]) == ["geochat-7b-q4", "geochat-7b-q4"]  # their own attribute
    path = export_detections(_dets()[2:], tmp_path / "q.gpkg", provenance={"model": Path("m.gguf")})
    assert list(pyogrio.raw.read(path, columns=["model"])[3][0]) == ["m.gguf"]
