"""The dock's widgets, row by row, laid out to stay usable 360 px wide: long labels wrap or
elide (with the whole text as tooltip), combo boxes shrink, small actions are tool buttons."""
from __future__ import annotations

from qgis.gui import QgsDockWidget
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from . import area as areas
from .chat_view import ChatView
from .dock_runs import TASKS
from .fitting_widgets import ElidedLabel, WrappedLabel, fit_popup, shrink_combo
from .model_choice import model_choices
from .results_bar import ResultsBar

DOCK_WIDTH = 360  # px: the narrowest the dock stays usable at (a laptop's side panel)


def build_widgets(dock: QgsDockWidget) -> QWidget:
    """Every widget of ``dock``, the GeoChatDock being built (set as its attributes, their
    signals connected to its methods); the body."""
    body = QWidget(dock)
    layout = QVBoxLayout(body)
    dock.layer_label = WrappedLabel(body)
    dock.layer_label.setObjectName("GeoChatLayerLabel")
    dock.layer_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    layout.addWidget(dock.layer_label)
    layout.addLayout(_runtime_row(dock, body))
    layout.addLayout(_model_row(dock, body))
    layout.addLayout(_status_row(dock, body))
    layout.addLayout(_task_row(dock, body))
    layout.addLayout(_area_row(dock, body))
    dock.classes_edit = QLineEdit(body)
    dock.classes_edit.setPlaceholderText("Classes, comma separated (e.g. forest, residential, river)")
    layout.addWidget(dock.classes_edit)
    dock.chat = ChatView(body)
    dock.chat.phraseClicked.connect(dock.select_phrase)
    layout.addWidget(dock.chat, 1)
    layout.addLayout(_prompt_row(dock, body))
    layout.addLayout(_progress_row(dock, body))
    layout.addWidget(dock.preview_label)
    dock.results_bar = ResultsBar(dock.iface, dock.chat.add, dock.open_settings, body)
    layout.addWidget(dock.results_bar)
    return body


def _runtime_row(dock: QgsDockWidget, body: QWidget) -> QHBoxLayout:
    """What the runtime lacks and the installer's button (both hidden while it is ready)."""
    dock.runtime_label, dock.runtime_button, row = _label_and_button(
        body, "GeoChatRuntimeStatus", "Install the runtime...", "GeoChatInstallRuntime",
        dock.install_runtime)
    dock.runtime_button.setToolTip("Install GeoChat's runtime (the core packages and the chosen "
                                   "backend) into its own environment; QGIS's Python is not changed")
    dock.runtime_label.setVisible(False)
    dock.runtime_button.setVisible(False)
    return row


def _model_row(dock: QgsDockWidget, body: QWidget) -> QHBoxLayout:
    row = QHBoxLayout()
    combo = dock.model_combo = shrink_combo(QComboBox(body))
    combo.setObjectName("GeoChatModel")
    for choice in model_choices():
        combo.addItem(choice.title, choice.key)
        combo.setItemData(combo.count() - 1, choice.note, Qt.ItemDataRole.ToolTipRole)
    combo.addItem("Model file or folder...", "")
    model = dock.settings.model
    if model and combo.findData(model) < 0:
        combo.insertItem(combo.count() - 1, model, model)
    if model:
        combo.setCurrentIndex(max(0, combo.findData(model)))
    fit_popup(combo)
    combo.activated.connect(dock._on_model_chosen)
    dock.backend_combo = QComboBox(body)
    dock.backend_combo.setObjectName("GeoChatBackend")
    for kind in ("llama.cpp", "transformers", "openai"):
        dock.backend_combo.addItem(kind, kind)
    dock.backend_combo.setCurrentIndex(max(0, dock.backend_combo.findData(dock.settings.backend)))
    dock.backend_combo.activated.connect(dock._on_backend_chosen)
    row.addWidget(QLabel("Model", body))
    row.addWidget(combo, 1)
    row.addWidget(dock.backend_combo)
    return row


def _status_row(dock: QgsDockWidget, body: QWidget) -> QHBoxLayout:
    """The chosen model's status and the Get button (shown when it is not downloaded)."""
    dock.status_label, dock.download_button, row = _label_and_button(
        body, "GeoChatModelStatus", "Get...", "GeoChatDownload", dock.download_model)
    return row


def _label_and_button(body: QWidget, label_name: str, text: str, button_name: str,
                      slot) -> tuple[WrappedLabel, QPushButton, QHBoxLayout]:
    """A wrapped label taking the row's width, its button at the end."""
    row = QHBoxLayout()
    label = WrappedLabel(body)
    label.setObjectName(label_name)
    button = QPushButton(text, body)
    button.setObjectName(button_name)
    button.clicked.connect(slot)
    row.addWidget(label, 1)
    row.addWidget(button)
    return label, button, row


def _task_row(dock: QgsDockWidget, body: QWidget) -> QHBoxLayout:
    row = QHBoxLayout()
    row.addWidget(QLabel("Task", body))
    dock.task_combo = shrink_combo(QComboBox(body))
    dock.task_combo.setObjectName("GeoChatTask")
    for task, label, _tiled in TASKS:
        dock.task_combo.addItem(label, task)
    dock.task_combo.setCurrentIndex(dock.task_combo.findData("refer"))
    fit_popup(dock.task_combo)
    dock.task_combo.currentIndexChanged.connect(dock._on_task_changed)
    row.addWidget(dock.task_combo, 1)
    return row


def _area_row(dock: QgsDockWidget, body: QWidget) -> QHBoxLayout:
    """Where to run: the area choice and the tools that draw one."""
    row = QHBoxLayout()
    row.addWidget(QLabel("Area", body))
    dock.area_combo = shrink_combo(QComboBox(body))
    dock.area_combo.setObjectName("GeoChatArea")
    for key, label in areas.CHOICES.items():
        dock.area_combo.addItem(label, key)
    fit_popup(dock.area_combo)
    canvas = dock.iface.mapCanvas()
    dock.draw_button = _tool_button("Draw", "Draw the rectangle to run on", body)
    dock.draw_button.clicked.connect(lambda: canvas.setMapTool(dock.rectangle_tool))
    dock.region_button = _tool_button(
        "Region", "Draw the region to identify: click vertices, right click to close", body)
    dock.region_button.clicked.connect(lambda: canvas.setMapTool(dock.region_tool))
    row.addWidget(dock.area_combo, 1)
    row.addWidget(dock.draw_button)
    row.addWidget(dock.region_button)
    return row


def _prompt_row(dock: QgsDockWidget, body: QWidget) -> QHBoxLayout:
    row = QHBoxLayout()
    dock.prompt_edit = QLineEdit(body)
    dock.prompt_edit.setObjectName("GeoChatPrompt")
    dock.prompt_edit.returnPressed.connect(dock.send)
    dock.send_button = QPushButton("Send", body)
    dock.send_button.setObjectName("GeoChatSend")
    dock.send_button.clicked.connect(dock.send)
    dock.cancel_button = QPushButton("Cancel", body)
    dock.cancel_button.setObjectName("GeoChatCancel")
    dock.cancel_button.setEnabled(False)
    dock.cancel_button.clicked.connect(dock.runner.cancel)
    row.addWidget(dock.prompt_edit, 1)
    row.addWidget(dock.send_button)
    row.addWidget(dock.cancel_button)
    return row


def _progress_row(dock: QgsDockWidget, body: QWidget) -> QHBoxLayout:
    """Preview and the progress bar; the run's status line (elided) goes on the row below, the
    dock's whole width."""
    row = QHBoxLayout()
    dock.preview_button = QPushButton("Preview tiles", body)
    dock.preview_button.clicked.connect(dock.show_preview)
    dock.preview_label = ElidedLabel(body)
    dock.preview_label.setObjectName("GeoChatRunStatus")
    dock.progress = QProgressBar(body)
    dock.progress.setRange(0, 100)
    dock.progress.setValue(0)
    row.addWidget(dock.preview_button)
    row.addWidget(dock.progress, 1)
    return row


def _tool_button(text: str, tip: str, parent: QWidget) -> QToolButton:
    button = QToolButton(parent)
    button.setText(text)
    button.setToolTip(tip)
    return button
