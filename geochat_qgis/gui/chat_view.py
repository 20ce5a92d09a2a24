"""The chat transcript: messages, streamed answers, and phrases linked to their map features.

A linked phrase is an anchor ``geochat:<layer id>:<label>``; clicking it emits ``phraseClicked``.
Selecting features elsewhere calls :meth:`highlight`, which marks their phrases.
"""
from __future__ import annotations

import html
import re
from typing import Any, Iterable, Optional
from urllib.parse import quote, unquote

from qgis.PyQt.QtCore import QUrl, pyqtSignal
from qgis.PyQt.QtGui import QTextCursor
from qgis.PyQt.QtWidgets import QTextBrowser, QWidget

SCHEME = "geochat"
HIGHLIGHT = "#ffe08a"
ROLE_STYLE = {
    "user": ("You", "#1f4e79"),
    "assistant": ("Model", "#2e7d32"),
    "info": ("", "#666666"),
    "error": ("Problem", "#b00020"),
}


def phrase_href(layer_id: str, label: str) -> str:
    return f"{SCHEME}:{quote(layer_id, safe='')}:{quote(label, safe='')}"


def parse_href(url: str) -> Optional[tuple[str, str]]:
    """(layer id, label) from a phrase link, None for any other link."""
    parts = url.split(":", 2)
    if len(parts) != 3 or parts[0] != SCHEME:
        return None
    return unquote(parts[1]), unquote(parts[2])


def linked_html(text: str, layer_id: Optional[str], counts: dict[str, int],
                highlighted: Iterable[str] = ()) -> str:
    """``text`` escaped, with each label's first mention linked, and a features line."""
    body = html.escape(text).replace("\n", "<br/>")
    if not layer_id or not counts:
        return body
    marked = set(highlighted)

    def anchor(label: str, shown: str) -> str:
        style = f' style="background-color:{HIGHLIGHT}"' if label in marked else ""
        return f'<a href="{phrase_href(layer_id, label)}"><span{style}>{shown}</span></a>'

    for label in sorted(counts, key=len, reverse=True):
        pattern = re.compile(re.escape(html.escape(label)), re.IGNORECASE)
        body = pattern.sub(lambda m, label=label: anchor(label, m.group(0)), body, count=1)
    features = ", ".join(f"{anchor(label, html.escape(label))} ({n})" for label, n in sorted(counts.items()))
    return f"{body}<br/><small>Features: {features}</small>"


class ChatView(QTextBrowser):
    """Shows one layer's conversation; ``messages`` are plain dicts (saved with the project)."""

    phraseClicked = pyqtSignal(str, str)  # noqa: N815 - (layer id, label)

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setObjectName("GeoChatChatView")
        self.setOpenLinks(False)
        self.anchorClicked.connect(self._on_anchor)
        self.messages: list[dict[str, Any]] = []
        self.highlighted: dict[str, set[str]] = {}  # layer id -> labels
        self._streaming = False

    def set_messages(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages
        self.render()

    def add(self, role: str, text: str, **extra: Any) -> dict[str, Any]:
        message = {"role": role, "text": text, **extra}
        self.messages.append(message)
        self.render()
        return message

    def begin_stream(self) -> None:
        """Open an answer that tokens are appended to as they arrive."""
        self.render()
        self._streaming = True
        self.moveCursor(QTextCursor.MoveOperation.End)
        self.insertHtml(self._header("assistant"))

    def append_token(self, piece: str) -> None:
        if self._streaming:
            self.moveCursor(QTextCursor.MoveOperation.End)
            self.insertPlainText(piece)
            self.ensureCursorVisible()

    def end_stream(self) -> None:
        self._streaming = False

    def highlight(self, layer_id: str, labels: Iterable[str]) -> None:
        self.highlighted[layer_id] = set(labels)
        self.render()

    def render(self) -> None:
        parts = []
        for message in self.messages:
            layer_id = message.get("layer_id")
            counts = message.get("counts") or {}
            body = linked_html(message.get("text", ""), layer_id, counts,
                               self.highlighted.get(layer_id or "", ()))
            parts.append(f"<p>{self._header(message['role'])}{body}</p>")
        self.setHtml("".join(parts))
        self.moveCursor(QTextCursor.MoveOperation.End)

    @staticmethod
    def _header(role: str) -> str:
        name, colour = ROLE_STYLE.get(role, ("", "#000000"))
        return f'<b style="color:{colour}">{name}:</b> ' if name else f'<span style="color:{colour}"></span>'

    def _on_anchor(self, url: QUrl) -> None:
        target = parse_href(url.toString())
        if target is not None:
            self.phraseClicked.emit(*target)
