"""The list of GeoChat Processing algorithms (each in its own module)."""
from __future__ import annotations

from qgis.core import QgsProcessingAlgorithm

from .describe_algorithm import DescribeAlgorithm
from .detect_algorithm import DetectAlgorithm
from .export_algorithm import ExportAlgorithm
from .segment_algorithm import SegmentAlgorithm


def algorithms() -> list[QgsProcessingAlgorithm]:
    """New instances of every algorithm the provider offers."""
    return [DetectAlgorithm(), SegmentAlgorithm(), DescribeAlgorithm(), ExportAlgorithm()]
