"""Widgets that let the dock fit a narrow laptop screen: a one-line label that elides what does
not fit (the whole text as its tooltip), a wrapped label that never widens the dock, and combo
boxes that shrink (their items' full text in the popup and the tooltip)."""
from __future__ import annotations

from typing import Optional

from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QPainter
from qgis.PyQt.QtWidgets import QComboBox, QLabel, QSizePolicy, QWidget

MIN_CHARACTERS = 5  # what a shrunk combo box still shows of its item
MAX_POPUP_WIDTH = 640  # px: a longer item (a model file's path) is cut in the middle there


class ElidedLabel(QLabel):
    """One line of plain text, cut in the middle with "…" where the dock is too narrow for it;
    then its tooltip holds the whole text. ``text()`` is always the whole text."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)

    def setText(self, text: str) -> None:  # noqa: N802 - Qt naming
        super().setText(text)
        self._update_tooltip()

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt naming
        return QSize(self.fontMetrics().horizontalAdvance("…") * 3, super().minimumSizeHint().height())

    def shown_text(self) -> str:
        """The text as painted at the label's width."""
        return self.fontMetrics().elidedText(self.text(), Qt.TextElideMode.ElideMiddle,
                                             self.contentsRect().width())

    def elided(self) -> bool:
        return self.shown_text() != self.text()

    def paintEvent(self, _event) -> None:  # noqa: N802 - Qt naming
        painter = QPainter(self)
        painter.drawText(self.contentsRect(), int(self.alignment() | Qt.AlignmentFlag.AlignVCenter),
                         self.shown_text())

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt naming
        super().resizeEvent(event)
        self._update_tooltip()

    def _update_tooltip(self) -> None:
        self.setToolTip(self.text() if self.elided() else "")


class WrappedLabel(QLabel):
    """Text wrapped at the dock's width: a label that never makes the dock wider (a word longer
    than the width, such as a path, is cut at the edge), its text also its tooltip unless a
    tooltip of its own is set after it."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWordWrap(True)
        policy = QSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        policy.setHeightForWidth(True)
        self.setSizePolicy(policy)

    def setText(self, text: str) -> None:  # noqa: N802 - Qt naming
        super().setText(text)
        self.setToolTip(text)

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt naming
        return QSize(0, super().minimumSizeHint().height())


def shrink_combo(combo: QComboBox) -> QComboBox:
    """Let ``combo`` be narrower than its longest item (:data:`MIN_CHARACTERS` shown), its
    popup as wide as the items and its tooltip the current item's whole text."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(MIN_CHARACTERS)
    combo.currentTextChanged.connect(lambda text: _combo_tooltip(combo, text))
    return combo


def fit_popup(combo: QComboBox) -> None:
    """The popup list as wide as its longest item up to :data:`MAX_POPUP_WIDTH` (longer ones
    cut in the middle); call after adding items."""
    view = combo.view()
    view.setTextElideMode(Qt.TextElideMode.ElideMiddle)
    metrics = combo.fontMetrics()
    longest = max((metrics.horizontalAdvance(combo.itemText(i)) for i in range(combo.count())), default=0)
    view.setMinimumWidth(min(MAX_POPUP_WIDTH, longest + 2 * view.frameWidth() + 24))
    _combo_tooltip(combo, combo.currentText())


def _combo_tooltip(combo: QComboBox, text: str) -> None:
    note = combo.currentData(Qt.ItemDataRole.ToolTipRole)
    combo.setToolTip(f"{text}\n{note}" if note else text)
