"""The dock's chat part: the conversation kept with the project per raster layer, and the links
between a phrase of an answer and the features of its result layer (click a phrase: its
features are selected; select features: their phrases are highlighted). Mixed into
GeoChatDock, which provides the chat view and the layer."""
from __future__ import annotations

from typing import Any

from qgis.core import QgsFeatureRequest, QgsProject, QgsVectorLayer

from .chat_history import save_history


class ChatMixin:
    """History and phrase <-> feature links for GeoChatDock."""

    def select_phrase(self, layer_id: str, label: str) -> None:
        """Select the features of ``label`` in the result layer and zoom to them."""
        layer = QgsProject.instance().mapLayer(layer_id)
        if not isinstance(layer, QgsVectorLayer):
            self.chat.add("info", "That result layer has been removed.")
            return
        expression = f'"label" = {_quote(label)}'
        ids = [f.id() for f in layer.getFeatures(QgsFeatureRequest().setFilterExpression(expression))]
        layer.selectByIds(ids)
        if ids:
            self.iface.mapCanvas().zoomToSelected(layer)
            self.iface.mapCanvas().flashFeatureIds(layer, ids)

    def _watch(self, layer: QgsVectorLayer) -> None:
        if layer.id() in self._watched_layers:
            return
        self._watched_layers.add(layer.id())
        layer.selectionChanged.connect(lambda *_: self._on_selection(layer))

    def _on_selection(self, layer: QgsVectorLayer) -> None:
        labels = {f["label"] for f in layer.getSelectedFeatures()}
        self.chat.highlight(layer.id(), labels)

    def _save(self, layer_id: str) -> None:
        if self.layer is not None and self.layer.id() == layer_id:
            save_history(QgsProject.instance(), layer_id, self.chat.messages)

    def _reload_history(self, *_args: Any) -> None:
        self.set_layer(self.iface.activeLayer())


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
