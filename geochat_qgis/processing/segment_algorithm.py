"""``geochat:segment``: GeoPixel masks for what a prompt names, as polygons."""
from __future__ import annotations

from typing import Any

from qgis.core import QgsProcessingContext

from . import parameters as p
from .detect_algorithm import DetectAlgorithm
from .request import read_model

DEVICE = "DEVICE"
DEVICES = (p.AUTO, "cpu", "cuda")


class SegmentAlgorithm(DetectAlgorithm):
    """Referring segmentation with GeoPixel (CPU or CUDA): the detect algorithm with masks."""

    NAME = "segment"
    DISPLAY_NAME = "Segment objects (GeoPixel)"
    HELP = (
        "Asks GeoPixel for a mask of what each prompt line names, in every tile of the raster's "
        "extent or area of interest, and writes the masks as polygons in the raster's CRS.<br>"
        "Runs on the CPU (about 18 GB of memory for the 7B model) or an NVIDIA GPU (CUDA).<br>"
        "<b>Model</b>: geopixel-7b or geopixel-7b-res from the catalog (got once with "
        "<i>models get</i> or the dock's Get...), tiny-geopixel-demo (random weights, no "
        "download: proves the set-up), or a GeoPixel checkpoint folder.<br>"
        "<b>Device</b>: auto takes CUDA when the runtime's torch sees a GPU, else the CPU.<br>"
        "<b>Task</b>: segment masks the objects a prompt names; grounding describes each tile "
        "with masks.<br>" + p.AREA_HELP + p.TILING_HELP + p.OVERLAP_HELP
    )
    TASKS = ("segment", "grounding")
    OUTPUT_NAME = "Masks"
    KIND = "geopixel"
    BOX_GRAMMAR = False

    def add_model_parameters(self) -> None:
        p.add_model_parameters(self, backends=(self.KIND,), mmproj=False)
        self.addParameter(p.advanced(p.choice(DEVICE, "Device", DEVICES, p.AUTO)))

    def read_model(self, parameters: dict, context: QgsProcessingContext) -> dict[str, Any]:
        device = self.parameterAsEnumString(parameters, DEVICE, context)
        return read_model(self, parameters, context, self.KIND,
                          {"device": device} if device not in ("", p.AUTO) else None)
