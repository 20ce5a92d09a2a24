"""The dependency installer dialog in real QGIS offscreen: real pip against PyPI, a real venv.

The managed environment is redirected into a temporary home folder (HOME and GEOCHAT_DEPS_DIR),
so the test also sees that paths are shown with the home folder as ~.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QCoreApplication
from qgis.PyQt.QtWidgets import QApplication, QDialog

from geochat_qgis.core.deps.environment import ManagedEnv
from geochat_qgis.core.deps.pip import probe_imports
from geochat_qgis.core.deps.requirements import BackendRequirements, PipStep
from geochat_qgis.gui.deps_dialog import DepsDialog
from geochat_qgis.plugin import MENU, GeoChatPlugin
from geochat_qgis.toolbelt.settings import PluginSettings

pytestmark = pytest.mark.slow

SMALL = BackendRequirements("demo", "cpu", (PipStep(("tomli-w",)),), ("tomli_w",), 1)
ABSENT = BackendRequirements("demo", "cpu", (PipStep(("geochat-qgis-no-such-package-zz7",)),),
                             ("geochat_no_such_module",), 1)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A temporary home folder holding the managed environments, for the whole module."""
    folder = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(folder))
        patch.setenv("GEOCHAT_DEPS_DIR", str(folder / "geochat"))
        yield folder


def wait_until(condition, timeout: float = 300.0) -> None:
    """Spin the event loop (task signals arrive through it) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        QCoreApplication.processEvents()
        time.sleep(0.01)


@pytest.fixture()
def dialog(qgis_app, home):
    widget = DepsDialog("demo", requirements=SMALL)
    widget.show()
    yield widget
    widget.close()
    wait_until(lambda: not widget.running)
    widget.deleteLater()


def test_explains_what_where_and_how_big(dialog, home):
    env = ManagedEnv.default()
    assert env.path.is_relative_to(home / "geochat")
    assert dialog.where_label.text() == f"~/geochat/{env.path.name}"  # home shown as ~
    assert dialog.packages_label.text() == "pip install tomli-w"
    assert dialog.size_label.text() == "about 1 MB to download and store"
    assert dialog.accelerator_combo.currentData() == "cpu"
    assert not dialog.accelerator_combo.isEnabled()  # given requirements fix the build
    assert dialog.install_button.isEnabled() and not dialog.cancel_button.isEnabled()


def test_real_backend_describes_its_cpu_or_cuda_build(qgis_app, home):
    widget = DepsDialog("llama.cpp", device="cpu")
    assert widget.accelerator_combo.isEnabled()
    assert "llama-cpp-python" in widget.packages_label.text()
    for core in ("numpy", "rasterio", "shapely", "pyproj", "pyogrio"):  # runtime = core + backend
        assert core in widget.packages_label.text()
    assert "/whl/cpu" in widget.packages_label.text() or sys.platform == "darwin"
    widget.accelerator_combo.setCurrentIndex(widget.accelerator_combo.findData("cuda"))
    widget.accelerator_combo.activated.emit(widget.accelerator_combo.currentIndex())
    assert widget.requirements.accelerator == "cuda"
    assert "1020 MB" in widget.size_label.text()  # the core (420 MB) + CUDA llama.cpp (600 MB)
    geopixel = DepsDialog("geopixel", device="cpu")  # GeoPixel runs on the CPU too: offered
    assert "torch" in geopixel.packages_label.text() and "/whl/cpu" in geopixel.packages_label.text()
    assert "transformers" in geopixel.packages_label.text()
    assert "flash" not in geopixel.packages_label.text()
    assert geopixel.install_button.isEnabled()
    for each in (widget, geopixel):
        each.deleteLater()


def test_installs_a_real_package_streaming_pips_lines(dialog):
    dialog.install_button.click()
    assert dialog.running and dialog.cancel_button.isEnabled()
    assert not dialog.install_button.isEnabled()
    assert dialog.progress.maximum() == 0  # busy indicator while pip runs
    arrivals: list[float] = []
    dialog.task.tokenReceived.connect(lambda _line: arrivals.append(time.monotonic()))
    wait_until(lambda: not dialog.running)
    ended = time.monotonic()
    log = dialog.log_view.toPlainText()
    assert dialog.installed, log
    assert "Successfully installed tomli-w" in log or "Successfully installed tomli_w" in log
    assert "Verifying: import tomli_w in a fresh process" in log
    # lines arrive while pip works (creating the venv alone takes seconds), not all at the end
    assert len(arrivals) >= 3 and ended - arrivals[0] > 1.0
    assert "Installed and verified" in dialog.status_label.text()
    assert [c.module for c in dialog.checks] == ["tomli_w"] and dialog.checks[0].version
    assert dialog.progress.maximum() == 1 and dialog.progress.value() == 1
    # the package is really in the managed environment, importable by a fresh process
    check = probe_imports(ManagedEnv.default().python, ["tomli_w"])[0]
    assert check.ok and Path(check.file).is_relative_to(ManagedEnv.default().path)
    dialog.close_button.click()
    assert dialog.result() == QDialog.DialogCode.Accepted


def test_a_package_that_does_not_exist_shows_pips_error(qgis_app, home):
    widget = DepsDialog("demo", requirements=ABSENT)
    widget.install_button.click()
    wait_until(lambda: not widget.running)
    status = widget.status_label.text()
    assert not widget.installed
    assert "pip failed" in status
    assert "No matching distribution" in status or "Could not find a version" in status
    assert "ERROR: " in widget.log_view.toPlainText()
    assert widget.install_button.isEnabled()  # one can try again
    widget.close_button.click()
    assert widget.result() == QDialog.DialogCode.Rejected
    widget.deleteLater()


@pytest.mark.parametrize("when", ["queued", "running"])
def test_cancel_stops_the_install(qgis_app, home, when):
    widget = DepsDialog("demo", requirements=ABSENT)
    widget.install_button.click()
    if when == "running":  # pip is asking the index (seconds) when the cancel comes
        wait_until(lambda: widget.task.status() == widget.task.TaskStatus.Running, timeout=60)
    widget.cancel_button.click()
    wait_until(lambda: not widget.running, timeout=60)
    assert widget.status_label.text() == "Cancelled."
    assert not widget.installed and widget.install_button.isEnabled()
    widget.deleteLater()


def test_copy_diagnostics_redacts_the_home_folder(dialog, home):
    QApplication.clipboard().clear()
    dialog.diagnostics_button.click()
    assert not dialog.diagnostics_button.isEnabled()
    wait_until(lambda: dialog.diagnostics_button.isEnabled())
    text = QApplication.clipboard().text()
    assert text.startswith("GeoChat for QGIS "), dialog.status_label.text()
    assert f"managed_env: ~/geochat/{ManagedEnv.default().path.name}" in text
    assert "backend llama.cpp: " in text
    assert str(home) not in text
    assert "copied to the clipboard" in dialog.status_label.text()


def test_plugin_menu_opens_the_installer_and_unload_removes_it(qgis_iface, home):
    plugin = GeoChatPlugin(qgis_iface)
    plugin.initGui()
    added = [call.args for call in qgis_iface.addPluginToRasterMenu.call_args_list]
    assert (MENU, plugin.deps_action) in added
    assert plugin.deps_action.text() == "Install model dependencies..."
    plugin.deps_action.trigger()
    dialog = plugin.deps_dialog
    assert dialog is not None and dialog.isVisible()
    assert dialog.backend == PluginSettings.load().backend
    action = plugin.deps_action
    plugin.unload()
    removed = [call.args for call in qgis_iface.removePluginRasterMenu.call_args_list]
    assert (MENU, action) in removed
    assert plugin.deps_action is None and plugin.deps_dialog is None
    assert not QgsApplication.taskManager().countActiveTasks()
