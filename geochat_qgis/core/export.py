"""Writing detections to Shapefile, GeoPackage or GeoJSON (pyogrio), atomically.

The file is written under a hidden temporary name in the destination folder, checked (every
file of it there and complete: GDAL's Shapefile writer can ignore a full disk), then renamed into
place (a shapefile's sidecars together, with the old ones restored if a rename fails). A failed or
cancelled export leaves no partial file and keeps any file it would have replaced. Writing into
an existing GeoPackage keeps its other layers (the copy that is renamed into place has them).
:func:`check_output` says before a long run whether a destination can be written at all.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import shapely

from .errors import Cancelled, ExportError, GeoChatError
from .georef import reproject_geometry, same_crs
from .results import Detection, geometry_array, polygonal
from .write_errors import free_bytes, write_failure


class _Incomplete(Exception):
    """A written file that is not all there (reported through :func:`write_failure`)."""


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
    # where the model's weights came from (core/weights/provenance.py's PROVENANCE_FIELDS)
    Field("model_src", "str", "model_src"),
    Field("model_rev", "str", "model_rev"),
    Field("model_hash", "str", "model_hash"),
    Field("converter", "str", "converter"),
    Field("quant", "str", "quant"),
)
# provenance fields read from Detection.attributes, else from the export's provenance
PROVENANCE = ("task", "prompt", "model", "raster", "run_id", "created", "model_src",
              "model_rev", "model_hash", "converter", "quant")
DRIVERS = {".shp": "ESRI Shapefile", ".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
SHAPEFILE_PARTS = (".shp", ".shx", ".dbf", ".prj", ".cpg")
SHAPEFILE_STALE = (".qix", ".sbn", ".sbx")  # spatial indexes of an old file: wrong once replaced
SHAPEFILE_HEADERS = {".shp": 100, ".shx": 100, ".dbf": 32}  # header bytes of each part
SHAPEFILE_TEXT_BYTES = 254  # a dBase text field holds at most 254 bytes
POLYGON, MULTIPOLYGON = 3, 6  # shapely geometry type ids
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")  # a GeoPackage's files while it is written


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def attribute_columns(
    detections: Sequence[Detection], provenance: Optional[Mapping[str, Any]] = None
) -> dict[str, list[Any]]:
    """The FIELDS values of ``detections``, one list per field name (None where unknown).

    The provenance fields come from each detection's ``attributes``, else from ``provenance``.
    Empty text becomes None (a null attribute).
    """
    provenance = provenance or {}

    def column(attribute: str) -> list[Any]:
        return list(map(attrgetter(attribute), detections))

    columns: dict[str, list[Any]] = {
        name: column(name) for name in ("label", "phrase", "angle", "score", "kind", "tile_id")
    }
    columns["flags"] = [",".join(flags) for flags in column("flags")]
    attributes = column("attributes")
    for name in PROVENANCE:  # free-form values: text them
        default = provenance.get(name)
        if any(attributes):
            values = [a.get(name, default) if a else default for a in attributes]
        else:
            values = [default] * len(detections)
        if not set(map(type, values)) <= {str, type(None)}:
            values = [None if v is None else str(v) for v in values]
        columns[name] = values
    for name in ("phrase", "flags", "tile_id"):
        columns[name] = [v or None for v in columns[name]]
    return {f.name: columns[f.name] for f in FIELDS}


def feature_values(
    det: Detection, provenance: Optional[Mapping[str, Any]] = None
) -> dict[str, Any]:
    """The FIELDS values of one detection, by field name (for a layer's feature)."""
    return {name: values[0] for name, values in attribute_columns([det], provenance).items()}


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
    path = check_output(path)
    driver = driver_for(path)
    finals = _final_paths(path, driver)
    provenance = {"created": now_iso(), **(provenance or {})}
    names = [f.shp_name if driver == "ESRI Shapefile" else f.name for f in FIELDS]
    temp = path.with_name(f".{path.stem}.partial-{uuid.uuid4().hex[:8]}{path.suffix}")
    temps = [temp.with_suffix(p.suffix) for p in finals] if driver == "ESRI Shapefile" else [temp]
    try:
        _check(cancel)
        geoms, out_crs = _geometries(detections, crs)
        values = attribute_columns(detections, provenance)
        columns = [_column(f, values[f.name], driver) for f in FIELDS]
        all_single = bool((shapely.get_type_id(geoms) == POLYGON).all())
        if driver == "GPKG" and _other_layers(path, layer or path.stem):
            shutil.copy2(path, temp)  # keep its other layers; a layer of the same name is replaced
        from pyogrio import raw

        raw.write(
            str(temp),
            shapely.to_wkb(geoms, output_dimension=2),  # QGIS's GEOS refuses the default 4
            columns,
            names,
            layer=layer or path.stem,
            driver=driver,
            geometry_type="Polygon" if all_single else "MultiPolygon",
            crs=out_crs,
            encoding="UTF-8" if driver == "ESRI Shapefile" else None,
            promote_to_multi=not all_single,
            # GeoPackage 1.2: what QGIS's GDAL reads without a warning (GDAL >= 3.11 writes 1.4)
            dataset_options={"VERSION": "1.2"} if driver == "GPKG" else None,
        )
        _verify(temps, driver, layer or path.stem, len(geoms), out_crs is not None)
        _check(cancel)
        _commit(dict(zip(finals, temps)), _stale(path, driver))
    except BaseException as exc:
        left = free_bytes(path.parent)  # before the partial file goes: what the write had left
        for leftover in temps + [temp.with_name(temp.name + s) for s in SQLITE_SIDECARS]:
            if leftover.exists():
                leftover.unlink()
        if isinstance(exc, (GeoChatError, KeyboardInterrupt, SystemExit)):
            raise
        raise ExportError(write_failure(path, exc, left)) from exc
    return path


def check_output(path: os.PathLike | str) -> Path:
    """``path`` if detections can be written there, else ExportError saying what to change.

    Checks the suffix, that the folder exists and takes new files (a probe file is created and
    removed), that no file of the output is a folder and that an existing GeoPackage is one.
    Cheap: front ends call it before the first tile so a bad output never costs a whole run.
    """
    path = Path(path)
    driver = driver_for(path)
    folder = path.parent
    if not folder.is_dir():
        raise ExportError(
            f"cannot write {path}: the folder {folder} does not exist: create it or choose an "
            f"existing folder"
        )
    if any(p.is_dir() for p in _final_paths(path, driver)):
        raise ExportError(f"{path} (or a sidecar file) is a folder: choose another file name")
    probe = folder / f".{path.stem}.probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.open("xb").close()
        probe.unlink()
    except OSError as exc:
        raise ExportError(write_failure(path, exc)) from exc
    if driver == "GPKG" and path.exists():
        _other_layers(path, "")  # ExportError when it is not a readable GeoPackage
    return path


def _verify(temps: Sequence[Path], driver: str, layer: str, count: int, has_crs: bool) -> None:
    """_Incomplete unless the written ``temps`` hold all ``count`` features.

    GDAL reports most write errors, but its Shapefile writer can ignore a full disk and leave
    short or empty files: their headers are checked against the sizes on disk.
    """
    if driver == "ESRI Shapefile":
        _verify_shapefile(temps, count, has_crs)
    missing = [p.name for p in temps[:1] if not p.is_file() or p.stat().st_size == 0]
    if missing:
        raise _Incomplete(f"{missing[0]} was not written")
    from pyogrio import read_info

    found = read_info(temps[0], layer=layer if driver == "GPKG" else None)["features"]
    if found != count:
        raise _Incomplete(f"only {found} of {count} features were written")


def _verify_shapefile(temps: Sequence[Path], count: int, has_crs: bool) -> None:
    """The .shp, .shx and .dbf sizes agree with their headers; .prj and .cpg are not empty."""
    parts = {p.suffix: p for p in temps}
    sizes = {s: (p.stat().st_size if p.is_file() else -1) for s, p in parts.items()}
    short = [s for s, least in SHAPEFILE_HEADERS.items() if sizes.get(s, -1) < least]
    short += [s for s in ((".prj",) if has_crs else ()) + (".cpg",) if sizes.get(s, -1) <= 0]
    if not short:
        with parts[".shp"].open("rb") as shp, parts[".shx"].open("rb") as shx:
            shp_words = struct.unpack(">i", shp.read(28)[24:28])[0]
            shx_words = struct.unpack(">i", shx.read(28)[24:28])[0]
        with parts[".dbf"].open("rb") as dbf:
            records, header, record = struct.unpack("<IHH", dbf.read(12)[4:12])
        if shp_words * 2 != sizes[".shp"]:
            short.append(".shp")
        if shx_words * 2 != sizes[".shx"] or sizes[".shx"] != 100 + 8 * count:
            short.append(".shx")
        if records != count or sizes[".dbf"] < header + records * record:
            short.append(".dbf")
    if short:
        raise _Incomplete(f"the shapefile's {', '.join(short)} part(s) were cut short")


def _other_layers(path: Path, layer: str) -> bool:
    """True when the GeoPackage at ``path`` exists and holds layers other than ``layer``."""
    if not path.exists():
        return False
    from pyogrio import list_layers
    from pyogrio.errors import DataSourceError

    try:
        names = list_layers(path)[:, 0]
    except (DataSourceError, OSError) as exc:  # not a readable GeoPackage
        raise ExportError(
            f"{path} exists but is not a readable GeoPackage ({exc}): choose another file name"
        ) from exc
    return any(name != layer for name in names)


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
) -> tuple[np.ndarray, Optional[str]]:
    """Polygonal geometries in the output CRS, and that CRS."""
    if "tile" in set(map(attrgetter("frame"), detections)):
        raise ExportError(
            "detections are still in tile pixels: georeference them before exporting"
        )
    own = list(dict.fromkeys(map(attrgetter("crs"), detections)))
    out_crs = crs if crs is not None else (own[0] if own else None)
    if (out_crs is None and any(own)) or (out_crs is not None and None in own):
        raise ExportError(
            "some detections have a CRS and others not: georeference all from rasters with a "
            "CRS, or export them separately"
        )
    if out_crs is not None:
        from pyproj import CRS
        from pyproj.exceptions import CRSError

        try:
            CRS.from_user_input(out_crs)
        except CRSError as exc:
            raise ExportError(
                f"unknown output CRS {str(out_crs)[:60]!r}: give one like 'EPSG:4326' or WKT"
            ) from exc
    foreign = {c for c in own if c is not None and not same_crs(c, out_crs)}
    geoms = geometry_array(detections)
    if foreign:
        for i, det in enumerate(detections):
            if det.crs in foreign:
                geoms[i] = reproject_geometry(det.geometry, det.crs, out_crs)
    odd = np.flatnonzero(~np.isin(shapely.get_type_id(geoms), (POLYGON, MULTIPOLYGON)))
    for i in odd:
        geoms[i] = polygonal(geoms[i])
    return geoms, out_crs


def _column(field: Field, values: list[Any], driver: str) -> np.ndarray:
    """One attribute column; text cut to 254 UTF-8 bytes in shapefiles (whole characters)."""
    if field.type == "float":
        return np.array(values, dtype=np.float64)  # None -> NaN -> null
    if driver == "ESRI Shapefile":
        too_long = {v for v in set(values) if v is not None and len(v) * 4 > SHAPEFILE_TEXT_BYTES}
        if too_long:
            fitted = {v: _fit_bytes(v, SHAPEFILE_TEXT_BYTES) for v in too_long}
            values = [fitted.get(v, v) for v in values]
    return np.array(values, dtype=object)


def _fit_bytes(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes without splitting a character."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore")
