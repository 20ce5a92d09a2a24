"""The Get dialog: download (and convert) a catalog model in the runtime child, with progress.

What getting the model takes comes from the runtime's model list (downloads, converted size per
choice, memory, what runs it here) and, once a choice is made, its get plan (disk and memory
against what is free). "Get" plans again and refuses before any byte when the plan has problems;
otherwise ``client.get_model`` runs in a QgsTask with one progress bar per phase (download,
convert, quantize, verify: done of total, rate, time left). Cancel stops it (downloads resume on
the next Get, a conversion restarts cleanly: the core keeps nothing half-written). Afterwards
the dialog offers to delete the original checkpoint. ``modelReady(name)`` tells the dock.

Qt, QGIS and the runtime client only: nothing of the core is imported in QGIS's process.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..client import shared_client
from ..core.deps.requirements import CONVERTER_BACKENDS, requirements_for  # stdlib only
from ..toolbelt.proxy_settings import qgis_proxy
from .client_task import ClientTask
from .deps_dialog import DepsDialog
from .get_words import PHASES, choice_label, describe_progress, human_bytes
from .model_choice import catalog_rows, describe_getting, remembered

RED, GREEN = "#b00020", "#2e7d32"


class GetModelDialog(QDialog):
    """Get ``row["name"]`` (a model_list row) with ``client``; ``cache_dir`` "" = default."""

    modelReady = pyqtSignal(str)  # noqa: N815 - Qt naming

    def __init__(self, row: dict, client: Any, cache_dir: str = "", parent: Optional[QWidget] = None,
                 endpoint: str = "") -> None:
        super().__init__(parent)
        self.row, self.client, self.cache_dir, self.endpoint = row, client, cache_dir, endpoint
        self.task: Optional[ClientTask] = None
        self.plan_task: Optional[ClientTask] = None
        self.result: Optional[dict] = None
        self.bars: dict[str, tuple[QLabel, QProgressBar]] = {}
        self.setWindowTitle(f"Get {row.get('title') or row['name']}")
        self.setObjectName("GeoChatGetModel")
        self._build()
        self.refresh_plan()

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        title = QLabel(f"<b>{self.row.get('title') or self.row['name']}</b>", self)
        layout.addWidget(title)
        self.takes_label = QLabel(describe_getting(self.row) or "nothing to download", self)
        self.takes_label.setObjectName("GeoChatGetTakes")
        self.takes_label.setWordWrap(True)
        layout.addWidget(self.takes_label)
        self.choice_combo = QComboBox(self)
        self.choice_combo.setObjectName("GeoChatGetChoice")
        for choice in self.row.get("choices") or []:
            self.choice_combo.addItem(choice_label(choice), (choice["target"], choice.get("quant")))
        self.choice_combo.currentIndexChanged.connect(lambda _i: self.refresh_plan())
        layout.addWidget(self.choice_combo)
        self.plan_label = QLabel(self)
        self.plan_label.setObjectName("GeoChatGetPlan")
        self.plan_label.setWordWrap(True)
        layout.addWidget(self.plan_label)
        self.memory_box = QCheckBox("Go ahead with less memory than the conversion needs "
                                    "(it may swap and take much longer)", self)
        self.memory_box.setObjectName("GeoChatGetIgnoreMemory")
        self.memory_box.setVisible(False)
        self.memory_box.toggled.connect(lambda _on: self.refresh_plan())
        layout.addWidget(self.memory_box)
        self.install_button = QPushButton("Install what converting needs...", self)
        self.install_button.setObjectName("GeoChatGetInstallConverter")
        self.install_button.setVisible(False)
        self.converter_backend = "llama.cpp"
        self.install_button.clicked.connect(self.install_converter)
        layout.addWidget(self.install_button)
        self.progress_grid = QGridLayout()
        layout.addLayout(self.progress_grid)
        self.status_label = QLabel(self)
        self.status_label.setObjectName("GeoChatGetStatus")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        buttons = QHBoxLayout()
        self.get_button = QPushButton("Get", self)
        self.get_button.setObjectName("GeoChatGetButton")
        self.get_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setObjectName("GeoChatGetCancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.delete_button = QPushButton("Delete the original checkpoint", self)
        self.delete_button.setObjectName("GeoChatGetDeleteSources")
        self.delete_button.setVisible(False)
        self.delete_button.clicked.connect(self.delete_sources)
        self.close_button = QPushButton("Close", self)
        self.close_button.clicked.connect(self.close)
        for button in (self.get_button, self.cancel_button, self.delete_button, self.close_button):
            buttons.addWidget(button)
        layout.addLayout(buttons)

    def choice(self) -> tuple[Optional[str], Optional[str]]:
        data = self.choice_combo.currentData()
        if not data or data[0] == "download":
            return None, None
        return data[0], data[1]

    def options(self) -> dict:
        target, quant = self.choice()
        options = {"target": target, "quant": quant, "cache_dir": self.cache_dir or None,
                   "endpoint": self.endpoint or None, "proxy": qgis_proxy(),
                   "ignore_memory": self.memory_box.isChecked() or None}
        return {k: v for k, v in options.items() if v is not None}

    def _say(self, label: QLabel, text: str, colour: Optional[str] = None) -> None:
        label.setText(f'<span style="color:{colour}">{text}</span>' if colour else text)

    # ------------------------------------------------------------------ plan
    def refresh_plan(self) -> None:
        """Ask the runtime for the chosen plan (disk, memory) in the background."""
        self._say(self.plan_label, "Checking disk and memory...")
        name, options = self.row["name"], self.options()
        self.plan_task = ClientTask("GeoChat: planning the model get",
                                    lambda _stop, _emit: self.client.plan_get(name, options))
        self.plan_task.done.connect(self._planned)
        QgsApplication.taskManager().addTask(self.plan_task)

    def _planned(self, plan: Optional[dict], error: str) -> None:
        if plan is None:
            self._say(self.plan_label, error, RED)
            return
        self.show_plan(plan)

    def show_plan(self, plan: dict) -> None:
        available, needed = plan.get("memory_available"), plan.get("memory_needed") or 0
        short = available is not None and not plan.get("installed") and available < needed
        self.memory_box.setVisible(short or self.memory_box.isChecked())
        self._offer_converter(plan)
        if plan.get("problems"):
            self._say(self.plan_label, " ".join(plan["problems"]), RED)
            return
        if plan.get("installed"):
            self._say(self.plan_label, f"Already got in {plan['installed']}.", GREEN)
            return
        resumed = sum(s.get("partial_bytes", 0) for s in plan.get("sources") or [])
        hf = sum(s.get("hf_cache_bytes", 0) for s in plan.get("sources") or [])
        parts = [f"{human_bytes(plan['download_bytes'])} to download"]
        if resumed:
            parts.append(f"resumes {human_bytes(resumed)} already downloaded")
        if hf:
            parts.append(f"{human_bytes(hf)} from the Hugging Face cache")
        parts.append(f"{human_bytes(plan['disk_needed'])} of disk needed, "
                     f"{human_bytes(plan['disk_free'])} free in {plan['disk_folder']}")
        if plan.get("memory_needed"):
            available = plan.get("memory_available")
            parts.append(f"converting needs about {human_bytes(plan['memory_needed'])} of memory"
                         + (f", {human_bytes(available)} available" if available else ""))
        self._say(self.plan_label, "; ".join(parts) + ".")

    def _offer_converter(self, plan: dict) -> None:
        """The install button, when the runtime lacks what converting needs: the packages of
        the backend that runs the chosen output (GGUF: llama.cpp, no torch), and their size."""
        missing = plan.get("conversion_missing") or []
        self.install_button.setVisible(bool(missing))
        if not missing:
            return
        self.converter_backend = CONVERTER_BACKENDS.get(plan.get("target") or "", "llama.cpp")
        needs = requirements_for(self.converter_backend, "cpu")
        self.install_button.setText(f"Install what converting needs ({', '.join(missing)}: the "
                                    f"{self.converter_backend} packages, about {needs.approx_mb} MB)...")
        self.install_button.setToolTip(f"The {self.converter_backend} backend's packages go into "
                                       "GeoChat's runtime environment; QGIS's Python is not changed")

    def install_converter(self) -> None:
        """The runtime lacks what converting needs: the installer for the chosen output's
        backend (into the runtime's environment); the plan is asked again once it closes."""
        self.deps_dialog = DepsDialog(self.converter_backend, self)
        self.deps_dialog.finished.connect(lambda _result: self.refresh_plan())
        self.deps_dialog.open()

    # ------------------------------------------------------------------ get
    @property
    def busy(self) -> bool:
        return self.task is not None

    def start(self) -> None:
        """Plan (refused before any byte when it does not fit), then get, in one task."""
        if self.busy:
            return
        name, options, client = self.row["name"], self.options(), self.client

        def work(stop: threading.Event, emit: Callable[[dict], None]) -> dict:
            plan = client.plan_get(name, options)
            emit({"type": "plan", "plan": plan})
            if not plan.get("ok", True):
                return {"refused": True, "plan": plan}
            return client.get_model(name, options, emit, stop)

        self.task = ClientTask(f"GeoChat: getting {name}", work)
        self.task.progressed.connect(self._on_event)
        self.task.done.connect(self._finished)
        self.get_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.choice_combo.setEnabled(False)
        self.delete_button.setVisible(False)
        self._say(self.status_label, f"Getting {name}...")
        QgsApplication.taskManager().addTask(self.task)

    def cancel(self) -> None:
        if self.task is not None:
            self._say(self.status_label, "Cancelling...")
            self.task.cancel()

    def _bar(self, phase: str) -> tuple[QLabel, QProgressBar]:
        if phase not in self.bars:
            row = len(self.bars)
            name = QLabel(PHASES.get(phase, phase.title()), self)
            bar = QProgressBar(self)
            bar.setObjectName(f"GeoChatGet_{phase}")
            bar.setRange(0, 1000)  # permille: byte counts overflow Qt's int past 2 GB
            text = QLabel(self)
            text.setObjectName(f"GeoChatGetText_{phase}")
            self.progress_grid.addWidget(name, row, 0)
            self.progress_grid.addWidget(bar, row, 1)
            self.progress_grid.addWidget(text, row, 2)
            self.bars[phase] = (text, bar)
        return self.bars[phase]

    def _on_event(self, event: dict) -> None:
        if event.get("type") == "plan":
            self.show_plan(event["plan"])
            return
        if event.get("type") != "get_model":
            return
        text, bar = self._bar(str(event.get("phase")))
        total = event.get("total")
        bar.setValue(int(1000 * (event.get("done") or 0) / total) if total else 0)
        text.setText(describe_progress(event))

    def _finished(self, result: Optional[dict], error: str) -> None:
        self.task = None
        self.get_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.choice_combo.setEnabled(True)
        if result is None:
            self._say(self.status_label, error, RED)
            return
        if result.get("refused"):
            self._say(self.status_label, "Not started: " + " ".join(result["plan"]["problems"]), RED)
            return
        self.result = result
        for _text, bar in self.bars.values():
            bar.setValue(1000)
        self._say(self.status_label, result.get("message") or f"{self.row['name']} is ready.", GREEN)
        self.get_button.setEnabled(False)
        self.modelReady.emit(self.row["name"])
        if self.row.get("needs_conversion"):
            self._offer_delete()

    # ------------------------------------------------------------------ afterwards
    def _offer_delete(self) -> None:
        name, cache = self.row["name"], self.cache_dir or None
        task = ClientTask("GeoChat: what the originals take",
                          lambda _stop, _emit: self.client.delete_sources(name, cache, dry_run=True))
        task.done.connect(self._show_offer)
        self._offer_task = task
        QgsApplication.taskManager().addTask(task)

    def _show_offer(self, offer: Optional[dict], _error: str) -> None:
        if not offer or not offer.get("bytes"):
            return
        self.delete_button.setText(f"Delete the original checkpoint (frees {human_bytes(offer['bytes'])})")
        self.delete_button.setToolTip("\n".join(offer.get("folders") or []))
        self.delete_button.setVisible(True)

    def delete_sources(self) -> None:
        name, cache = self.row["name"], self.cache_dir or None
        self.delete_button.setEnabled(False)
        task = ClientTask("GeoChat: deleting the original checkpoint",
                          lambda _stop, _emit: self.client.delete_sources(name, cache))
        task.done.connect(self._deleted)
        self._delete_task = task
        QgsApplication.taskManager().addTask(task)

    def _deleted(self, reply: Optional[dict], error: str) -> None:
        if reply is None:
            self._say(self.status_label, error, RED)
            self.delete_button.setEnabled(True)
            return
        self.delete_button.setVisible(False)
        self._say(self.status_label, f"Deleted the original checkpoint ({human_bytes(reply['bytes'])} "
                                     "freed); the converted model keeps working.", GREEN)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt naming
        """Closing while a get runs cancels it (downloads resume next time)."""
        if self.task is not None:
            self.task.cancel()
        super().closeEvent(event)


def open_get_dialog(name: str, cache_dir: str, parent: Optional[QWidget],
                    on_ready: Callable[[str], None], client: Any = None) -> GetModelDialog:
    """Show the Get dialog for catalog model ``name`` (not modal: the dock stays usable);
    ``on_ready(name)`` once it is got. The row is the runtime's last model list, else the
    catalog's."""
    row = remembered(name) or next((r for r in catalog_rows() if r["name"] == name), {"name": name})
    dialog = GetModelDialog(row, client or shared_client(), cache_dir, parent)
    dialog.modelReady.connect(on_ready)
    dialog.show()
    return dialog
