"""Where an algorithm's vector output goes: the destination the user chose, as a file path (and
GeoPackage layer) the runtime writes itself, by the core's rule (an existing file is replaced
only by a complete run)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from qgis.core import QgsProcessingAlgorithm, QgsProcessingContext, QgsProcessingException

# the formats the core's writer writes (core/export.py DRIVERS)
DRIVERS = {".shp": "ESRI Shapefile", ".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
EXTENSIONS = ["gpkg", "shp", "geojson"]  # what the provider offers in destination widgets
# what the "Save to GeoPackage..." choice of a vector destination gives
_OGR_URI = re.compile(
    r"^ogr:dbname='(?P<path>(?:[^']|'')+)'\s+table=\"(?P<layer>(?:[^\"]|\"\")+)\"")


def destination(value: str) -> tuple[Path, Optional[str]]:
    """The file and layer name of a vector destination: a path, or an ``ogr:dbname=...`` URI."""
    match = _OGR_URI.match(value)
    if match:
        return Path(match["path"].replace("''", "'")), match["layer"].replace('""', '"')
    if "|" in value:
        path, _, options = value.partition("|")
        layer = re.search(r"layername=([^|]+)", options)
        return Path(path), layer.group(1) if layer else None
    return Path(value), None


def output_file(alg: QgsProcessingAlgorithm, parameters: dict, context: QgsProcessingContext,
                name: str) -> tuple[str, Path, Optional[str]]:
    """(the destination as QGIS gives it, file path, GeoPackage layer) of the vector
    destination ``name``; QgsProcessingException for a format the core does not write."""
    value = alg.parameterAsOutputLayer(parameters, name, context)
    if not value:
        raise QgsProcessingException(alg.invalidSinkError(parameters, name))
    path, layer = destination(value)
    path = Path(os.path.abspath(path.expanduser()))  # the runtime child may run elsewhere
    if path.suffix.lower() not in DRIVERS:
        raise QgsProcessingException(
            f"{path.name}: GeoChat writes .shp, .gpkg or .geojson files; choose one of them "
            "for the output.")
    if DRIVERS[path.suffix.lower()] != "GPKG":
        layer = None
    return value, path, layer


def point_loading_to(context: QgsProcessingContext, requested: str, written: str) -> None:
    """Load ``written`` instead of ``requested`` at the end (a partial run's file beside it)."""
    layers = context.layersToLoadOnCompletion()
    if requested in layers and requested != written:
        details = layers.pop(requested)
        layers[written] = details
        context.setLayersToLoadOnCompletion(layers)
