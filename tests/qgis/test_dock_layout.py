"""The dock fits a laptop (issue 24): usable 360 px wide whatever its labels say (long ones wrap
or elide, with the whole text as tooltip), and after a finished run its status line says how
the run ended, not what the runtime was doing before."""
from __future__ import annotations

from qgis.PyQt.QtCore import QCoreApplication, Qt
from qgis.PyQt.QtWidgets import QAbstractButton, QComboBox, QLabel, QLineEdit, QWidget

from geochat_qgis.gui import area as areas
from geochat_qgis.gui.dock_widgets import DOCK_WIDTH
from geochat_qgis.gui.fitting_widgets import MAX_POPUP_WIDTH
from qgis_runtime import run_until_done
from test_dock_flow import dock  # noqa: F401 - the dock on the demo raster, tiny-demo chosen

LONG_PATH = "/home/analyst/projects/" + "very-long-folder-name/" * 6 + "tiny-demo"


def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        QCoreApplication.processEvents()


def fill_with_long_texts(dock) -> None:
    """What makes a dock wide: a long layer summary, a failing runtime line, a long model
    status with a path, a long run status."""
    dock.layer_label.setText("a raster layer named " + "x" * 120 + " | EPSG:32633 | 40000 x 40000 px")
    dock.runtime_label.setText(f"The GeoChat runtime lacks llama-cpp-python in {LONG_PATH}: install it")
    dock.runtime_label.setVisible(True)
    dock.runtime_button.setVisible(True)
    dock._show_status("not found", f"no model file at {LONG_PATH}/model.gguf")
    dock.preview_label.setText(f"loading {LONG_PATH}")
    dock.add_model_path(0, f"{LONG_PATH}/model.gguf")  # as "Model file or folder..." does


def test_the_dock_is_usable_360_px_wide(dock):
    fill_with_long_texts(dock)
    settle()
    assert dock.minimumSizeHint().width() <= DOCK_WIDTH, dock.minimumSizeHint()
    dock.resize(DOCK_WIDTH, 900)
    dock.show()
    settle()
    body = dock.widget()
    assert body.width() <= DOCK_WIDTH
    controls = [w for w in body.findChildren(QWidget) if w.isVisible()
                and isinstance(w, (QAbstractButton, QComboBox, QLineEdit, QLabel))]
    assert len(controls) > 15
    for widget in controls:  # nothing pushed past the dock's right edge, nothing squeezed away
        right = widget.mapTo(body, widget.rect().topRight()).x()
        assert right <= body.width(), f"{widget.objectName() or type(widget).__name__} ends at {right}"
        assert widget.width() > 0 and widget.height() > 0
    for button in (w for w in controls if isinstance(w, QAbstractButton)):
        text = button.text().replace("&", "")
        assert button.width() >= button.fontMetrics().horizontalAdvance(text), text  # not cut


def test_long_labels_wrap_or_elide_with_the_whole_text_as_tooltip(dock):
    fill_with_long_texts(dock)
    dock.resize(DOCK_WIDTH, 900)
    dock.show()
    settle()
    for label in (dock.layer_label, dock.status_label):
        assert label.wordWrap() and label.height() > label.fontMetrics().height() * 1.5
        assert label.toolTip() == label.text()
    assert dock.runtime_label.wordWrap() and dock.runtime_label.toolTip()
    status = dock.preview_label
    assert status.text() == f"loading {LONG_PATH}" and status.elided()
    assert status.toolTip() == status.text() and "…" in status.shown_text()
    status.setText("9 tile(s)")
    assert not status.elided() and status.toolTip() == ""
    combo = dock.model_combo
    assert combo.width() < combo.fontMetrics().horizontalAdvance(combo.currentText())
    assert combo.currentText() in combo.toolTip()
    popup = combo.view()  # the popup: wider than the combo, a path cut in its middle
    assert popup.minimumWidth() == MAX_POPUP_WIDTH
    assert popup.textElideMode() == Qt.TextElideMode.ElideMiddle


def test_after_a_finished_run_the_status_says_how_it_ended(dock):
    dock.task_combo.setCurrentIndex(dock.task_combo.findData("refer"))
    dock.area_combo.setCurrentIndex(dock.area_combo.findData(areas.LAYER))
    dock.prompt_edit.setText("car")
    statuses: list[str] = []
    dock.preview_label.setText("")
    wire = dock._wire

    def watched(run, *args):  # every status line the run showed, in order
        run.statusChanged.connect(statuses.append)
        wire(run, *args)

    dock._wire = watched
    dock.send()
    run_until_done(dock)
    assert dock.progress.value() == 100
    text = dock.preview_label.text()
    assert text.startswith("done: ") and "found, 9/9 tile(s)" in text, (text, statuses)
    dock.resize(DOCK_WIDTH, 900)
    dock.show()
    settle()
    assert not dock.preview_label.elided(), text  # 360 px wide, the status line is whole
    assert not text.startswith("loading") and dock.chat.messages[-1]["role"] == "assistant"
