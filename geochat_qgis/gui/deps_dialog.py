"""The dependency installer dialog: what a backend needs, where it goes, how big; install it.

Install runs the core's ``install_backend`` in a GeoChatTask: pip's lines stream into the log
as they come, the import check in a fresh process ends it. Closing the dialog while it installs
cancels the install (pip is stopped; what it finished stays). ``exec()`` returns
``QDialog.DialogCode.Accepted`` when the packages were installed and verified here, else ``Rejected``.
"""
from __future__ import annotations

from typing import Optional

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QFontDatabase
from qgis.PyQt.QtWidgets import (
    QApplication,
    QComboBox,
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..core.deps.diagnostics import diagnostics_text, redact
from ..core.deps.environment import ManagedEnv, platform_tag
from ..core.deps.pip import ImportCheck, install_backend
from ..core.deps.requirements import BackendRequirements, requirements_for
from ..core.errors import GeoChatError
from . import deps_check
from .run_task import GeoChatTask

ERROR_COLOUR, OK_COLOUR = "#b00020", "#2e7d32"
# pip lines worth showing as the current phase next to the progress bar
PHASES = ("Creating", "Collecting", "Downloading", "Building", "Installing", "Successfully",
          "Verifying")
ACCELERATORS = (("cpu", "CPU build"), ("cuda", "CUDA build (NVIDIA GPU)"))


def _gpu_sentence() -> str:
    gpus = deps_check.detected_gpus()
    if not gpus:
        return "No NVIDIA GPU found (nvidia-smi)."
    return "Found " + "; ".join(f"{g.name} ({g.memory_mb} MB)" for g in gpus) + "."


class DepsDialog(QDialog):
    """Installs ``backend``'s packages into the managed environment.

    ``requirements`` and ``env`` default to the backend's requirement set for the detected (or
    set) accelerator and to ``ManagedEnv.default()``; given requirements fix the build.
    """

    def __init__(self, backend: str, parent: Optional[QWidget] = None,
                 requirements: Optional[BackendRequirements] = None,
                 env: Optional[ManagedEnv] = None, device: str = "auto") -> None:
        super().__init__(parent)
        self.setObjectName("GeoChatDepsDialog")
        self.setWindowTitle(f"GeoChat: install the {backend} packages")
        self.backend = backend
        self.env = env or ManagedEnv.default()
        self.requirements = requirements
        self.checks: list[ImportCheck] = []  # the import checks of a finished install
        self.installed = False
        self.task: Optional[GeoChatTask] = None
        self._outcome_shown = False  # the running install's result or error reached the dialog
        self.diagnostics_task: Optional[GeoChatTask] = None
        self._build_ui(requirements.accelerator if requirements else deps_check.accelerator(device),
                       fixed=requirements is not None)
        self._describe()

    # ------------------------------------------------------------------ UI
    def _build_ui(self, accelerator: str, fixed: bool) -> None:
        layout = QVBoxLayout(self)
        intro = QLabel(
            f"The {self.backend} backend runs with the Python packages below. They go into an "
            "environment the plugin manages, outside the plugin folder (plugin upgrades keep "
            f"it), made for this Python and platform ({platform_tag()}). QGIS's own Python is "
            "not changed.", self)
        intro.setWordWrap(True)
        layout.addWidget(intro)

        form = QFormLayout()
        self.accelerator_combo = QComboBox(self)
        self.accelerator_combo.setObjectName("GeoChatDepsAccelerator")
        for key, label in ACCELERATORS:
            self.accelerator_combo.addItem(label, key)
        self.accelerator_combo.setCurrentIndex(max(0, self.accelerator_combo.findData(accelerator)))
        self._fixed = fixed
        self.accelerator_combo.setEnabled(not fixed)
        self.accelerator_combo.activated.connect(self._on_accelerator_chosen)
        self.packages_label = self._value_label()
        self.where_label = self._value_label()
        self.where_label.setText(redact(str(self.env.path)))
        self.size_label = self._value_label()
        self.note_label = self._value_label()
        form.addRow("Build", self.accelerator_combo)
        form.addRow("", self._value_label(_gpu_sentence()))
        form.addRow("Packages", self.packages_label)
        form.addRow("Where", self.where_label)
        form.addRow("Size", self.size_label)
        form.addRow("", self.note_label)
        layout.addLayout(form)

        self.progress = QProgressBar(self)
        self.progress.setObjectName("GeoChatDepsProgress")
        self.progress.setTextVisible(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status_label = self._value_label()
        self.status_label.setObjectName("GeoChatDepsStatus")
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        self.log_view = QPlainTextEdit(self)
        self.log_view.setObjectName("GeoChatDepsLog")
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        self.log_view.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.log_view.setPlaceholderText("pip's output appears here while it installs.")
        self.log_view.setMinimumHeight(160)
        layout.addWidget(self.log_view, 1)

        buttons = QHBoxLayout()
        self.install_button = QPushButton("Install", self)
        self.install_button.setObjectName("GeoChatDepsInstall")
        self.install_button.clicked.connect(self.install)
        self.cancel_button = QPushButton("Cancel install", self)
        self.cancel_button.setObjectName("GeoChatDepsCancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel_install)
        self.diagnostics_button = QPushButton("Copy diagnostics", self)
        self.diagnostics_button.setObjectName("GeoChatDepsDiagnostics")
        self.diagnostics_button.setToolTip("Versions, paths (home folder as ~), GPU and the last "
                                           "errors, for a bug report")
        self.diagnostics_button.clicked.connect(self.copy_diagnostics)
        self.close_button = QPushButton("Close", self)
        self.close_button.clicked.connect(self.reject)
        for button in (self.install_button, self.cancel_button, self.diagnostics_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.close_button)
        layout.addLayout(buttons)
        self.resize(680, 640)

    def _value_label(self, text: str = "") -> QLabel:
        label = QLabel(text, self)
        label.setWordWrap(True)
        label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        return label

    def _describe(self) -> None:
        """Fill in packages, size and note for the current requirement set."""
        requirements = self.requirements
        if requirements is None:
            try:
                requirements = self.requirements = requirements_for(
                    self.backend, self.accelerator_combo.currentData())
            except GeoChatError as exc:
                self.packages_label.setText("")
                self.size_label.setText("")
                self.note_label.setText("")
                self._set_status(str(exc), ERROR_COLOUR)
                self.install_button.setEnabled(False)
                return
        commands = ["pip " + " ".join(step.pip_args()) for step in requirements.steps]
        self.packages_label.setText("\n".join(commands) or "nothing to install")
        self.size_label.setText(f"about {requirements.approx_mb} MB to download and store")
        self.note_label.setText(requirements.note)
        self.install_button.setEnabled(self._can_install())
        self._set_status("", "")

    def _set_status(self, text: str, colour: str) -> None:
        self.status_label.setStyleSheet(f"color: {colour}" if colour else "")
        self.status_label.setText(text)

    def _on_accelerator_chosen(self, _index: int) -> None:
        self.requirements = None
        self._describe()

    # ------------------------------------------------------------------ install
    @property
    def running(self) -> bool:
        return self.task is not None

    def install(self) -> None:
        """Start installing (a QgsTask); lines, then the verification, arrive in the log."""
        if self.running or self.requirements is None:
            return
        env, requirements = self.env, self.requirements

        def work(cancel, on_token, _on_progress):
            cancel.raise_if_cancelled()
            return install_backend(env, requirements, lambda line: on_token(0, line), cancel)

        self.installed = False
        self.checks = []
        self._outcome_shown = False
        self.log_view.clear()
        self.task = GeoChatTask(f"GeoChat: installing the {self.backend} packages", work)
        self.task.tokenReceived.connect(self._on_line)
        self.task.resultReady.connect(self._on_installed)
        self.task.failed.connect(self._on_failed)
        self.task.taskCompleted.connect(self._on_task_ended)
        self.task.taskTerminated.connect(self._on_task_ended)
        self._set_running(True)
        self._set_status(f"Installing into {redact(str(env.path))}...", "")
        QgsApplication.taskManager().addTask(self.task)

    def cancel_install(self) -> None:
        """Stop pip; the dialog says so once the task has ended."""
        if self.task is not None:
            self._set_status("Cancelling...", "")
            # The token alone: it stops pip, and a task not started yet stops as it starts.
            # QgsTask.cancel() on a still queued task crashed QGIS 3.22 now and then (in a
            # thread-pool thread, soon after; 2 runs in 36 of the cancel test, 0 in 20 since).
            self.task.cancel_token.cancel()

    def _can_install(self) -> bool:
        return not self.running and self.requirements is not None and bool(self.requirements.steps)

    def _set_running(self, running: bool) -> None:
        self.install_button.setEnabled(self._can_install())
        self.cancel_button.setEnabled(running)
        self.accelerator_combo.setEnabled(not running and not self._fixed)
        self.progress.setRange(0, 0 if running else 1)  # busy while running
        self.progress.setValue(1 if self.installed else 0)

    def _on_line(self, line: str) -> None:
        self.log_view.appendPlainText(line)
        if line.startswith(PHASES):
            self._set_status(line, "")

    def _on_installed(self, checks: list) -> None:
        self._outcome_shown = True
        self.checks = list(checks)
        self.installed = True
        modules = ", ".join(f"{c.module} {c.version}".strip() for c in self.checks)
        for check in self.checks:
            line = f"ok  {check.module} {check.version} ({check.file})"
            self.log_view.appendPlainText(redact(line))
        self._set_status(f"Installed and verified (imported in a fresh process): {modules}. "
                         "Close this window and run again.", OK_COLOUR)

    def _on_failed(self, message: str) -> None:
        self._outcome_shown = True
        self.log_view.appendPlainText(message)
        self._set_status(message, ERROR_COLOUR)

    def _on_task_ended(self) -> None:
        if not self._outcome_shown:  # cancelled in QGIS's task list before it started
            self._on_failed("Cancelled.")
        self.task = None
        self._set_running(False)

    # ------------------------------------------------------------------ diagnostics
    def copy_diagnostics(self) -> None:
        """Put the diagnostics report on the clipboard (built off the main thread: it imports
        each backend's modules in a fresh process)."""
        if self.diagnostics_task is not None:
            return
        env = self.env

        def work(_cancel, _on_token, _on_progress):
            return diagnostics_text(env)

        self.diagnostics_task = GeoChatTask("GeoChat: diagnostics", work)
        self.diagnostics_task.resultReady.connect(self._on_diagnostics)
        self.diagnostics_task.failed.connect(self._on_failed)
        self.diagnostics_task.taskCompleted.connect(self._on_diagnostics_ended)
        self.diagnostics_task.taskTerminated.connect(self._on_diagnostics_ended)
        self.diagnostics_button.setEnabled(False)
        self.diagnostics_button.setText("Collecting diagnostics...")
        QgsApplication.taskManager().addTask(self.diagnostics_task)

    def _on_diagnostics(self, text: str) -> None:
        QApplication.clipboard().setText(text)
        self._set_status("Diagnostics copied to the clipboard (home folder shown as ~).", OK_COLOUR)

    def _on_diagnostics_ended(self) -> None:
        self.diagnostics_task = None
        self.diagnostics_button.setEnabled(True)
        self.diagnostics_button.setText("Copy diagnostics")

    # ------------------------------------------------------------------ closing
    def done(self, _result: int) -> None:
        """Every way of closing ends here: a running install is cancelled; the result is
        Accepted when the packages were installed and verified here (whichever button)."""
        self.cancel_install()
        super().done(QDialog.DialogCode.Accepted if self.installed else QDialog.DialogCode.Rejected)
