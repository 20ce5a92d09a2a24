"""The dock's model part: the model and backend choice, whether the runtime can run it (and its
installer), the model's status line, getting a catalog model. Mixed into GeoChatDock, which
provides the widgets (dock_widgets.py)."""
from __future__ import annotations

from typing import Any

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QFileDialog

from ..client import RuntimeState, close_shared_client, runtime_command, runtime_state, shared_client
from ..core.errors import GeoChatError  # stdlib only
from .deps_dialog import DepsDialog
from .fitting_widgets import fit_popup
from .get_model_dialog import open_get_dialog
from .model_choice import (
    CHECKING,
    MISSING,
    NEEDS_GPU,
    NOT_FOUND,
    SERVER,
    UNREACHABLE,
    backend_for,
    check_server,
    fetch_rows,
    model_choices,
    model_status,
    remember_rows,
)
from .run_task import GeoChatTask
from .settings_dialog import SettingsDialog

RED, GREEN = "#b00020", "#2e7d32"


class ModelMixin:
    """Model choice, runtime and model status for GeoChatDock."""

    def model_key(self) -> str:
        return self.model_combo.currentData() or self.settings.model

    def _follow_model_family(self) -> None:
        """A GeoPixel model runs with the geopixel backend (the backend combo is greyed) and
        segments: a task it has no prompt for becomes Segment."""
        geopixel = backend_for(self.model_key(), self.settings) == "geopixel"
        self.backend_combo.setEnabled(not geopixel)
        self.backend_combo.setToolTip("GeoPixel models run with the geopixel backend (torch, "
                                      "CPU or CUDA)" if geopixel else "")
        if geopixel and self.task_name not in ("chat", "grounding", "segment"):
            self.task_combo.setCurrentIndex(self.task_combo.findData("segment"))

    def _on_model_chosen(self, index: int) -> None:
        key = self.model_combo.itemData(index)
        if key == "":
            path, _ = QFileDialog.getOpenFileName(self, "GeoChat model (GGUF, or config.json of a "
                                                  "checkpoint folder)", "", "Models (*.gguf *.json)")
            if not path:
                return
            key = path[:-len("/config.json")] if path.endswith("/config.json") else path
            self.add_model_path(index, key)
        self.settings.model = key
        self.settings.save()
        self._follow_model_family()
        self.refresh_runtime()
        self.refresh_model_status()

    def add_model_path(self, index: int, path: str) -> None:
        """A model file or folder chosen by hand, listed at ``index`` and chosen."""
        self.model_combo.insertItem(index, path, path)
        self.model_combo.setItemData(index, path, Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setCurrentIndex(index)
        fit_popup(self.model_combo)

    def _on_backend_chosen(self, _index: int) -> None:
        self.settings.backend = self.backend_combo.currentData()
        self.settings.save()
        self.refresh_runtime()
        self.refresh_model_status()

    def open_settings(self) -> None:
        dialog = SettingsDialog(self.settings, self)
        if dialog.exec():
            self.backend_combo.setCurrentIndex(max(0, self.backend_combo.findData(self.settings.backend)))
            self.refresh_runtime()
            self.refresh_model_status()

    # ------------------------------------------------------------------ runtime
    def refresh_runtime(self) -> None:
        """Say whether the runtime can run the chosen backend: at once when none is installed,
        else after a short probe of its interpreter in the background (no child started)."""
        if runtime_command() is None:
            self.show_runtime(RuntimeState(False, None, [], ""))
            return
        backend = backend_for(self.model_key(), self.settings)

        def probe(_cancel, _token, _progress):
            return runtime_state(backend=backend)

        self._runtime_check = GeoChatTask("GeoChat: checking the runtime", probe, quiet=True)
        self._runtime_check.resultReady.connect(self.show_runtime)
        QgsApplication.taskManager().addTask(self._runtime_check)

    def show_runtime(self, state: Any) -> None:
        """Show a runtime state (client.RuntimeState): nothing when ready, else what is missing
        and the install button."""
        if state.ready:
            self.runtime_ready()
            return
        backend = backend_for(self.model_key(), self.settings)
        if state.python is None:
            text = (f"The GeoChat runtime is not installed. It holds the model packages (the "
                    f"core and the {backend} backend) in an environment of its own, outside "
                    "QGIS's Python: install it once with the button.")
        else:
            missing = ", ".join(state.missing) or "its packages"
            text = (f"The GeoChat runtime lacks {missing} for the {backend} backend: install "
                    "them with the button.")
        self.runtime_label.setText(f'<span style="color:{RED}">{text}</span>')
        self.runtime_label.setToolTip(state.message or text)
        self.runtime_label.setVisible(True)
        self.runtime_button.setVisible(True)

    def runtime_ready(self) -> None:
        self.runtime_label.setVisible(False)
        self.runtime_button.setVisible(False)

    def install_runtime(self) -> None:
        """Open the installer for the chosen backend (core packages + backend, into the managed
        environment); the runtime line follows once it closes."""
        if self._deps_dialog is not None and self._deps_dialog.isVisible():
            self._deps_dialog.raise_()
            return
        self._deps_dialog = DepsDialog(backend_for(self.model_key(), self.settings), self,
                                       device=self.settings.device)
        self._deps_dialog.finished.connect(self._on_installer_closed)
        self._deps_dialog.open()

    def _on_installer_closed(self, _result: int) -> None:
        dialog = self._deps_dialog
        if dialog is not None and dialog.installed:
            self.on_runtime_installed()
        self.refresh_runtime()
        self.refresh_model_status()

    def on_runtime_installed(self) -> None:
        """After an install (this dock's button or the plugin menu): a child started before it
        is not reused, and the models are listed afresh."""
        if not self.runner.busy:
            close_shared_client()
        remember_rows([])

    # ------------------------------------------------------------------ model status
    def refresh_model_status(self) -> None:
        try:
            status, sentence = model_status(self.model_combo.currentData() or "", self.settings)
        except GeoChatError as exc:
            status, sentence = NOT_FOUND, str(exc)
        self._show_status(status, sentence)
        self.download_button.setVisible(status == MISSING)
        if status == SERVER:
            self._check_server()
        elif status == CHECKING:
            self._fetch_models()

    def _fetch_models(self) -> None:
        """Ask the runtime for the model list in the background; the status line follows."""
        cache = self.settings.cache_dir
        self._model_list = GeoChatTask("GeoChat: listing models",
                                       lambda _cancel, _token, _progress: fetch_rows(shared_client(), cache),
                                       quiet=True)
        self._model_list.resultReady.connect(lambda _rows: self._on_models_listed())
        QgsApplication.taskManager().addTask(self._model_list)

    def _on_models_listed(self) -> None:
        """The runtime's list is in: each item says what runs it here; the status follows."""
        for choice in model_choices():
            index = self.model_combo.findData(choice.key)
            if index >= 0:
                self.model_combo.setItemData(index, choice.note, Qt.ItemDataRole.ToolTipRole)
        self.refresh_model_status()

    def _show_status(self, status: str, sentence: str) -> None:
        colour = RED if status in (MISSING, NEEDS_GPU, NOT_FOUND, UNREACHABLE) else GREEN
        self.status_label.setText(f'<span style="color:{colour}">{status}</span>: {sentence}')

    def _check_server(self) -> None:
        """Ask the server for its models in the background; the status line follows."""
        key, settings, api_key = self.model_combo.currentData() or "", self.settings, self._api_key()
        self._server_check = GeoChatTask("GeoChat: checking the server", lambda _cancel, _token, _progress:
                                         check_server(shared_client(), key, settings, api_key), quiet=True)
        self._server_check.resultReady.connect(lambda result: self._show_status(*result))
        QgsApplication.taskManager().addTask(self._server_check)

    def download_model(self) -> None:
        """Open the Get dialog for the chosen catalog model (download and convert in the
        runtime, with progress); the status follows once it is got."""
        name = self.model_combo.currentData()
        if name:
            self._get_dialog = open_get_dialog(name, self.settings.cache_dir, self, self._on_model_got)

    def _on_model_got(self, name: str) -> None:
        self.chat.add("info", f"{name} is ready.")
        remember_rows([])  # listed afresh: the status line follows
        self.refresh_model_status()
