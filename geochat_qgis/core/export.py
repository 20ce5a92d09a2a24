"""Writing detections to Shapefile, GeoPackage or GeoJSON (pyogrio), atomically.

The file is written under a hidden temporary name in the destination folder, then renamed into
place (a shapefile's sidecars together, with the old ones restored if a rename fails). A failed or
cancelled export leaves no partial file and keeps any file it would have replaced. Writing into
an existing GeoPackage keeps its other layers (the copy that is renamed into place has them).
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from .errors import Cancelled, ExportError, GeoChatError
from .results import Detection, polygonal


@dataclass(frozen=True)
class Field:
    """One attribute of an exported detection: its name, type ("str" | "float") and the name it
    has in a shapefile (10 characters at most)."""

    name: str
    type: str
    shp_name: str


# The attribute schema of exported detections, shared with the QGIS result layers.
FIELDS: tuple[Field, ...] = (
    Field("label", "str", "label"),
    Field("phrase", "str", "phrase"),
    Field("task", "str", "task"),
    Field("prompt", "str", "prompt"),
    Field("model", "str", "model"),
    Field("angle", "float", "angle"),
    Field("score", "float", "score"),
    Field("kind", "str", "kind"),
    Field("flags", "str", "flags"),
    Field("tile_id", "str", "tile_id"),
    Field("raster", "str", "raster"),
    Field("run_id", "str", "run_id"),
    Field("created", "str", "created"),  # ISO 8601, UTC
)
# provenance fields read from Detection.attributes, else from the export's provenance
PROVENANCE = ("task", "prompt", "model", "raster", "run_id", "created")
DRIVERS = {".shp": "ESRI Shapefile", ".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
SHAPEFILE_PARTS = (".shp", ".shx", ".dbf", ".prj", ".cpg")
SHAPEFILE_STALE = (".qix", ".sbn", ".sbx")  # spatial indexes of an old file: wrong once replaced
SHAPEFILE_TEXT_BYTES = 254  # a dBase text field holds at most 254 bytes


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def feature_values(
    det: Detection, provenance: Optional[Mapping[str, Any]] = None
) -> dict[str, Any]:
    """The FIELDS values of one detection (None where unknown)."""
    provenance = provenance or {}
    values: dict[str, Any] = {
        "label": det.label,
        "phrase": det.phrase or None,
        "angle": det.angle,
        "score": det.score,
        "kind": det.kind,
        "flags": ",".join(det.flags) or None,
        "tile_id": det.tile_id or None,
    }
    for name in PROVENANCE:
        value = det.attributes.get(name, provenance.get(name))
        values[name] = None if value is None else str(value)
    return values


def driver_for(path: Path) -> str:
    """The OGR driver for ``path``'s suffix; ExportError for an unknown one."""
    driver = DRIVERS.get(path.suffix.lower())
    if driver is None:
        raise ExportError(
            f"cannot export to {path.name}: use a .shp, .gpkg or .geojson file name"
        )
    return driver


def export_detections(
    detections: Sequence[Detection],
    path: os.PathLike | str,
    crs: Optional[str] = None,
    layer: Optional[str] = None,
    *,
    provenance: Optional[Mapping[str, Any]] = None,
    cancel: Any = None,
) -> Path:
    """Write ``detections`` to ``path`` (driver from its suffix) and return the path.

    ``crs`` is the output CRS (WKT or authority string); detections in another CRS are
    reprojected. Without it the detections' own CRS is used. ``provenance`` fills the task,
    prompt, model, raster, run_id and created attributes a detection does not carry itself
    (``created`` defaults to now). ``cancel`` (a CancelToken) is checked before the file is put
    in place; a cancelled export raises Cancelled and writes nothing.
    """
    path = Path(path)
    driver = driver_for(path)
    if not path.parent.is_dir():
        raise ExportError(f"the folder {path.parent} does not exist: choose an existing folder")
    finals = _final_paths(path, driver)
    if any(p.is_dir() for p in finals):
        raise ExportError(f"{path} (or a sidecar file) is a folder: choose another file name")
    provenance = {"created": now_iso(), **(provenance or {})}
    names = [f.shp_name if driver == "ESRI Shapefile" else f.name for f in FIELDS]
    temp = path.with_name(f".{path.stem}.partial-{uuid.uuid4().hex[:8]}{path.suffix}")
    temps = [temp.with_suffix(p.suffix) for p in finals] if driver == "ESRI Shapefile" else [temp]
    try:
        _check(cancel)
        geoms, out_crs = _geometries(detections, crs)
        rows = [feature_values(d, provenance) for d in detections]
        columns = [_column(f, rows, driver) for f in FIELDS]
        all_single = all(g.geom_type == "Polygon" for g in geoms)
        if driver == "GPKG" and path.exists():
            shutil.copy2(path, temp)  # keep its other layers; a layer of the same name is replaced
        from pyogrio import raw

        raw.write(
            str(temp),
            shapely.to_wkb(np.array(geoms, dtype=object)),
            columns,
            names,
            layer=layer or path.stem,
            driver=driver,
            geometry_type="Polygon" if all_single else "MultiPolygon",
            crs=out_crs,
            encoding="UTF-8" if driver == "ESRI Shapefile" else None,
            promote_to_multi=not all_single,
        )
        _check(cancel)
        _commit(dict(zip(finals, temps)), _stale(path, driver))
    except BaseException as exc:
        for leftover in temps + [temp.with_name(temp.name + s) for s in ("-wal", "-shm")]:
            if leftover.exists():
                leftover.unlink()
        if isinstance(exc, (GeoChatError, KeyboardInterrupt, SystemExit)):
            raise
        raise ExportError(f"could not write {path}: {exc}") from exc
    return path


def _check(cancel: Any) -> None:
    if cancel is not None and cancel.cancelled:
        raise Cancelled("export cancelled: nothing was written")


def _final_paths(path: Path, driver: str) -> list[Path]:
    if driver != "ESRI Shapefile":
        return [path]
    return [path.with_suffix(s) for s in SHAPEFILE_PARTS]


def _stale(path: Path, driver: str) -> list[Path]:
    """Files of an existing shapefile the new one does not write (removed once it is in place)."""
    if driver != "ESRI Shapefile":
        return []
    return [path.with_suffix(s) for s in SHAPEFILE_PARTS + SHAPEFILE_STALE]


def _commit(moves: dict[Path, Path], stale: Sequence[Path]) -> None:
    """Rename each temp into its final place; all or nothing, old files restored on failure."""
    moves = {final: temp for final, temp in moves.items() if temp.exists()}
    tag = uuid.uuid4().hex[:8]
    backups: dict[Path, Path] = {}
    placed: list[Path] = []
    try:
        for final in dict.fromkeys(list(moves) + list(stale)):
            if final.exists():
                backup = final.with_name(f".{final.name}.old-{tag}")
                os.replace(final, backup)
                backups[final] = backup
        for final, temp in moves.items():
            os.replace(temp, final)
            placed.append(final)
    except BaseException:
        for final in placed:
            final.unlink()
        for final, backup in backups.items():
            os.replace(backup, final)
        raise
    for backup in backups.values():
        backup.unlink()


def _geometries(
    detections: Sequence[Detection], crs: Optional[str]
) -> tuple[list[BaseGeometry], Optional[str]]:
    """Polygonal geometries in the output CRS, and that CRS."""
    from .georef import reproject_geometry, same_crs

    if any(d.frame == "tile" for d in detections):
        raise ExportError(
            "detections are still in tile pixels: georeference them before exporting"
        )
    own = list(dict.fromkeys(d.crs for d in detections))
    out_crs = crs if crs is not None else (own[0] if own else None)
    if out_crs is not None:
        from pyproj import CRS

        try:
            CRS.from_user_input(out_crs)
        except Exception as exc:  # pyproj.exceptions.CRSError
            raise ExportError(
                f"unknown output CRS {str(out_crs)[:60]!r}: give one like 'EPSG:4326' or WKT"
            ) from exc
    geoms = []
    for det in detections:
        geom = det.geometry
        if out_crs is not None and det.crs is not None and not same_crs(det.crs, out_crs):
            geom = reproject_geometry(geom, det.crs, out_crs)
        elif (det.crs is None) != (out_crs is None):
            raise ExportError(
                "some detections have a CRS and others not: georeference all from rasters with a "
                "CRS, or export them separately"
            )
        geoms.append(polygonal(geom))
    return geoms, out_crs


def _column(field: Field, rows: Sequence[dict[str, Any]], driver: str) -> np.ndarray:
    """One attribute column; text cut to 254 UTF-8 bytes in shapefiles (whole characters)."""
    values = [row[field.name] for row in rows]
    if field.type == "float":
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    if driver == "ESRI Shapefile":
        values = [None if v is None else _fit_bytes(v, SHAPEFILE_TEXT_BYTES) for v in values]
    return np.array(values, dtype=object)


def _fit_bytes(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes without splitting a character."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore")
