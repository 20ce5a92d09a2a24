"""The QGIS plugin object: actions, the chat dock, the Processing provider, logging."""
from __future__ import annotations

import logging
from typing import Optional

from qgis.core import QgsApplication
from qgis.gui import QgisInterface
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .__about__ import resource
from .client import close_shared_client
from .processing.provider import GeoChatProvider
from .toolbelt.log_handler import QgisLogHandler, install_log_handler, remove_log_handler
from .toolbelt.settings import PluginSettings

MENU = "&GeoChat"
log = logging.getLogger(__name__)


class GeoChatPlugin:
    """Created by ``classFactory``; QGIS calls ``initGui`` and ``unload``."""

    def __init__(self, iface: QgisInterface) -> None:
        self.iface = iface
        self.action: Optional[QAction] = None
        self.deps_action: Optional[QAction] = None
        self.deps_dialog = None
        self.dock = None
        self.provider = None
        self.log_handler: Optional[QgisLogHandler] = None

    # -- QGIS hooks
    def initProcessing(self) -> None:  # noqa: N802 - QGIS API
        if self.provider is None:
            self.provider = GeoChatProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802 - QGIS API
        self.log_handler = install_log_handler()
        self.action = QAction(QIcon(str(resource("icon.png"))), "GeoChat", self.iface.mainWindow())
        self.action.setObjectName("GeoChatToggleDock")
        self.action.setCheckable(True)
        self.action.setToolTip("Chat with a vision-language model about the active raster")
        self.action.toggled.connect(self._on_action_toggled)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToRasterMenu(MENU, self.action)
        self.deps_action = QAction("Install model dependencies...", self.iface.mainWindow())
        self.deps_action.setObjectName("GeoChatInstallDeps")
        self.deps_action.triggered.connect(self.show_deps_dialog)
        self.iface.addPluginToRasterMenu(MENU, self.deps_action)
        self.initProcessing()
        log.info("GeoChat loaded")

    def unload(self) -> None:
        if self.dock is not None:
            self.dock.visibilityChanged.disconnect(self.action.setChecked)
            self.dock.cleanup()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.action is not None:
            self.action.toggled.disconnect(self._on_action_toggled)
            self.iface.removePluginRasterMenu(MENU, self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action.deleteLater()
            self.action = None
        if self.deps_dialog is not None:
            self.deps_dialog.close()  # cancels a running install
            self.deps_dialog.deleteLater()
            self.deps_dialog = None
        if self.deps_action is not None:
            self.deps_action.triggered.disconnect(self.show_deps_dialog)
            self.iface.removePluginRasterMenu(MENU, self.deps_action)
            self.deps_action.deleteLater()
            self.deps_action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        close_shared_client()  # the runtime child (and its loaded model) goes with the plugin
        if self.log_handler is not None:
            remove_log_handler(self.log_handler)
            self.log_handler = None

    # -- dock
    def show_dock(self) -> None:
        """Open the chat dock (creating it the first time)."""
        if self.dock is None:
            from .gui.dock import GeoChatDock  # on first use: QGIS starts ~50 ms faster (ALLOWED_LOCAL)

            self.dock = GeoChatDock(self.iface, self.iface.mainWindow())
            self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
            self.dock.visibilityChanged.connect(self.action.setChecked)
        self.dock.show()
        self.dock.raise_()
        if self.action is not None:
            blocked = self.action.blockSignals(True)  # already showing: no toggled round trip
            self.action.setChecked(True)
            self.action.blockSignals(blocked)

    def show_deps_dialog(self, *_args) -> None:
        """Open the dependency installer for the backend in the settings (not blocking)."""
        from .gui.deps_dialog import DepsDialog  # on first use, as the dock

        if self.deps_dialog is None or not self.deps_dialog.isVisible():
            if self.deps_dialog is not None:
                self.deps_dialog.deleteLater()
            settings = PluginSettings.load()
            self.deps_dialog = DepsDialog(settings.backend, self.iface.mainWindow(),
                                          device=settings.device)
            self.deps_dialog.finished.connect(self._on_deps_dialog_closed)
        self.deps_dialog.open()
        self.deps_dialog.raise_()

    def _on_deps_dialog_closed(self, _result: int) -> None:
        if self.dock is not None:
            if self.deps_dialog is not None and self.deps_dialog.installed:
                self.dock.on_runtime_installed()
            self.dock.refresh_runtime()

    def _on_action_toggled(self, checked: bool) -> None:
        if checked:
            self.show_dock()
        elif self.dock is not None:
            self.dock.hide()
