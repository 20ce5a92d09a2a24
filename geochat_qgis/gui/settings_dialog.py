"""The settings dialog: backend, model, device, tiles, angle convention, server and its key."""
from __future__ import annotations

from typing import Optional

from qgis.gui import QgsAuthConfigSelect
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QLineEdit,
    QSpinBox,
    QWidget,
)

from ..toolbelt.settings import PluginSettings

ANGLE_HELP = ("GeoChat's box angle is not documented: 'none' writes axis-aligned boxes (the angle "
              "is kept as an attribute); 'ccw'/'cw' rotate the boxes by it")


def _combo(values: tuple[str, ...], current: str, parent: QWidget) -> QComboBox:
    combo = QComboBox(parent)
    combo.addItems(values)
    combo.setCurrentText(current)
    return combo


def _spin(value: float, low: float, high: float, parent: QWidget, decimals: int = 0):
    spin = QDoubleSpinBox(parent) if decimals else QSpinBox(parent)
    if decimals:
        spin.setDecimals(decimals)
    spin.setRange(low, high)
    spin.setValue(value)
    return spin


class SettingsDialog(QDialog):
    """Edits a PluginSettings; ``accept`` saves it. The API key stays in the auth manager."""

    def __init__(self, settings: PluginSettings, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("GeoChat settings")
        self.setObjectName("GeoChatSettingsDialog")
        self.settings = settings
        form = QFormLayout(self)
        self.backend = _combo(("llama.cpp", "transformers", "openai"), settings.backend, self)
        self.model = QLineEdit(settings.model, self)
        self.mmproj = QLineEdit(settings.mmproj, self)
        self.cache_dir = QLineEdit(settings.cache_dir, self)
        self.cache_dir.setPlaceholderText("default: ~/.cache/geochat-qgis")
        self.device = _combo(("auto", "cpu", "cuda"), settings.device, self)
        self.threads = _spin(settings.threads, 0, 256, self)
        self.gpu_layers = _spin(settings.gpu_layers, -1, 999, self)
        self.tile_size = _spin(settings.tile_size, 0, 4096, self)
        self.tile_size.setSpecialValueText("the model's own")
        self.overlap = _spin(settings.overlap, 0.0, 0.9, self, decimals=2)
        self.gsd = _spin(settings.gsd, 0.0, 10000.0, self, decimals=3)
        self.iou = _spin(settings.iou_threshold, 0.05, 1.0, self, decimals=2)
        self.angle = _combo(("none", "ccw", "cw"), settings.angle_convention, self)
        self.angle.setToolTip(ANGLE_HELP)
        self.grammar = QCheckBox("Constrain find-objects answers to boxes (llama.cpp)", self)
        self.grammar.setChecked(settings.grammar)
        self.max_tokens = _spin(settings.max_new_tokens, 1, 4096, self)
        self.server_url = QLineEdit(settings.server_url, self)
        self.server_model = QLineEdit(settings.server_model, self)
        self.auth = QgsAuthConfigSelect(self)
        self.auth.setConfigId(settings.auth_config_id)
        rows = (
            ("Backend", self.backend), ("Model (name or path)", self.model),
            ("mmproj (GGUF)", self.mmproj), ("Model cache folder", self.cache_dir),
            ("Device", self.device), ("Threads (0 = auto)", self.threads),
            ("GPU layers (-1 = all when a GPU is present)", self.gpu_layers),
            ("Tile size (px)", self.tile_size), ("Tile overlap (fraction)", self.overlap),
            ("Ground resolution (m, 0 = native)", self.gsd), ("Merge IoU threshold", self.iou),
            ("GeoChat angle convention", self.angle), ("", self.grammar),
            ("Max new tokens", self.max_tokens), ("Server URL", self.server_url),
            ("Server model name", self.server_model), ("Server API key", self.auth),
        )
        for label, widget in rows:
            form.addRow(label, widget)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok
                                   | QDialogButtonBox.StandardButton.Cancel, parent=self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def apply(self) -> PluginSettings:
        """Copy the widgets into the settings (and save them)."""
        s = self.settings
        s.backend = self.backend.currentText()
        s.model, s.mmproj = self.model.text().strip(), self.mmproj.text().strip()
        s.cache_dir = self.cache_dir.text().strip()
        s.device, s.threads, s.gpu_layers = self.device.currentText(), self.threads.value(), self.gpu_layers.value()
        s.tile_size, s.overlap, s.gsd = self.tile_size.value(), self.overlap.value(), self.gsd.value()
        s.iou_threshold, s.angle_convention = self.iou.value(), self.angle.currentText()
        s.grammar, s.max_new_tokens = self.grammar.isChecked(), self.max_tokens.value()
        s.server_url, s.server_model = self.server_url.text().strip(), self.server_model.text().strip()
        s.auth_config_id = self.auth.configId()
        s.save()
        return s

    def accept(self) -> None:
        self.apply()
        super().accept()
