"""``geochat:segment``: GeoPixel masks for what a prompt names, as polygons."""
from __future__ import annotations

from typing import Any

from qgis.core import QgsProcessingContext, QgsProcessingException, QgsProcessingParameterFile

from . import parameters as p
from .detect_algorithm import DetectAlgorithm
from .request import read_model
from .running import call, ready_client

GEOPIXEL_SOURCE = "GEOPIXEL_SOURCE"
NEEDS_GPU = (
    "GeoPixel needs an NVIDIA GPU with CUDA (its code calls .cuda() and uses flash attention); "
    "the GeoChat runtime finds none on this machine. Use Detect objects with the GeoChat GGUF "
    "model and the llama.cpp backend instead: it runs on the CPU and answers with oriented "
    "boxes instead of masks.")


class SegmentAlgorithm(DetectAlgorithm):
    """Referring segmentation with GeoPixel (CUDA only): the detect algorithm with masks."""

    NAME = "segment"
    DISPLAY_NAME = "Segment objects (GeoPixel)"
    HELP = (
        "Asks GeoPixel for a mask of what each prompt line names, in every tile of the raster's "
        "extent or area of interest, and writes the masks as polygons in the raster's CRS.<br>"
        "<b>Needs an NVIDIA GPU with CUDA</b> (GeoPixel's own code requires it); on other "
        "machines use Detect objects with the GeoChat GGUF model.<br>"
        "<b>Model</b>: geopixel-7b or geopixel-7b-res from the catalog, or a weights folder; "
        "<b>GeoPixel source</b>: a checkout of mbzuai-oryx/GeoPixel.<br>"
        "<b>Task</b>: segment masks the objects a prompt names; grounding describes each tile "
        "with masks.<br>" + p.AREA_HELP + p.TILING_HELP + p.OVERLAP_HELP
    )
    TASKS = ("segment", "grounding")
    OUTPUT_NAME = "Masks"
    KIND = "geopixel"
    BOX_GRAMMAR = False

    def add_model_parameters(self) -> None:
        p.add_model_parameters(self, backends=(self.KIND,), mmproj=False)
        self.addParameter(p.advanced(QgsProcessingParameterFile(
            GEOPIXEL_SOURCE, "GeoPixel source checkout",
            QgsProcessingParameterFile.Folder, optional=True)))

    def read_model(self, parameters: dict, context: QgsProcessingContext) -> dict[str, Any]:
        source = self.parameterAsFile(parameters, GEOPIXEL_SOURCE, context)
        return read_model(self, parameters, context, self.KIND,
                          {"source": source} if source else None)

    def check_runtime(self) -> None:
        """No GPU: refused before any weights check sends the user elsewhere."""
        status = call(ready_client(self.KIND).status)
        if not status.get("gpus"):
            raise QgsProcessingException(NEEDS_GPU)
