"""Styling a detections output like the dock's result layers once QGIS loads it."""
from __future__ import annotations

import collections
from typing import Sequence

from qgis.core import QgsProcessingLayerPostProcessorInterface, QgsVectorLayer

from ..gui.result_layers import style_layer


class DetectionStyle(QgsProcessingLayerPostProcessorInterface):
    """Applies the result-layer style (QML, one colour per label, map tips) to a loaded output."""

    # QGIS keeps only a pointer to a post-processor: the last ones made are kept alive here
    _alive: collections.deque = collections.deque(maxlen=64)

    def __init__(self, labels: Sequence[str], masks: bool) -> None:
        super().__init__()
        self.labels = list(labels)
        self.masks = masks

    @classmethod
    def attach(cls, context, destination: str, labels: Sequence[str], masks: bool) -> None:
        """Style ``destination`` when QGIS loads it at the end of the run (if it does)."""
        if not context.willLoadLayerOnCompletion(destination):
            return
        style = cls(labels, masks)
        cls._alive.append(style)
        context.layerToLoadOnCompletionDetails(destination).setPostProcessor(style)

    def postProcessLayer(self, layer, context, feedback) -> None:  # noqa: N802 - QGIS API
        if isinstance(layer, QgsVectorLayer) and layer.isValid():
            style_layer(layer, self.labels, self.masks)
