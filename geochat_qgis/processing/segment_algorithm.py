"""``geochat:segment``: GeoPixel masks for what a prompt names, as polygons."""
from __future__ import annotations

from qgis.core import QgsProcessingContext, QgsProcessingParameterFile

from . import parameters as p
from .detect_algorithm import DetectAlgorithm

GEOPIXEL_SOURCE = "GEOPIXEL_SOURCE"


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
    FAMILY = "geopixel"
    BOX_GRAMMAR = False

    def add_model_parameters(self) -> None:
        p.add_model_parameters(self, backends=(self.KIND,), mmproj=False)
        self.addParameter(p.advanced(QgsProcessingParameterFile(
            GEOPIXEL_SOURCE, "GeoPixel source checkout",
            QgsProcessingParameterFile.Folder, optional=True)))

    def read_backend(self, parameters: dict, context: QgsProcessingContext):
        """The GeoPixel spec; BackendError first on a machine without CUDA (before any
        download or weights check sends the user elsewhere)."""
        from ..core.backends.geopixel import NEEDS_GPU, cuda_available
        from ..core.errors import BackendError

        if not cuda_available():
            raise BackendError(NEEDS_GPU)
        source = self.parameterAsFile(parameters, GEOPIXEL_SOURCE, context)
        return p.read_backend(self, parameters, context, self.KIND, self.FAMILY,
                              {"source": source} if source else None)
