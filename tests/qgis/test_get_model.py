"""The Get dialog in real QGIS, against a hub on 127.0.0.1 serving a tiny GeoChat laid out as
MBZUAI/geochat-7B and a tiny CLIP-336: the runtime child (GEOCHAT_RUNTIME_PYTHON) downloads and
converts; QGIS's process holds only the dialog and the client.

- "Get" ends with a ready model, and a find-objects run with it adds a layer whose features
  carry the provenance attributes; the original checkpoint can then be deleted; the same from
  the dock (its model list, its Get... button, its run);
- a cancel during the download keeps the bytes and the next Get resumes them, as it does after
  QGIS quits mid-download; QGIS's proxy settings carry the downloads; too little memory offers
  to go ahead anyway;
- a cancel during the conversion leaves no model and no temporary files;
- a full disk (a small tmpfs as the cache) is refused before any byte is downloaded;
- a missing shard on the server gives a clear message.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from qgis.core import QgsApplication, QgsProject, QgsVectorLayer
from qgis.PyQt.QtCore import Qt

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "unit"))
from hub_repos import GEOCHAT_REPO, geochat_hub  # noqa: E402

from geochat_qgis.client import RuntimeClient  # noqa: E402
from geochat_qgis.gui import model_choice  # noqa: E402
from geochat_qgis.gui.get_model_dialog import GetModelDialog, open_get_dialog  # noqa: E402

RUNTIME = os.environ.get("GEOCHAT_RUNTIME_PYTHON", "")
SHARD_1, SHARD_2 = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
HEAVY = ("numpy", "shapely", "rasterio", "pyproj", "pyogrio", "torch", "transformers",
         "llama_cpp", "gguf", "PIL")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not RUNTIME, reason="set GEOCHAT_RUNTIME_PYTHON")]


@pytest.fixture(scope="session")
def repos(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny repositories, written by the runtime's Python (numpy; QGIS's has none)."""
    folder = tmp_path_factory.mktemp("repos")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from hub_repos import tiny_geochat_repos;"
              " tiny_geochat_repos(__import__('pathlib').Path(sys.argv[2]))")
    done = subprocess.run([RUNTIME, "-c", script, str(ROOT / "tests" / "unit"), str(folder)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "geochat-7B", folder / "clip-vit-large-patch14-336"


@pytest.fixture
def hub(repos, tmp_path, monkeypatch):
    yield from geochat_hub(tmp_path, monkeypatch, repos)


@pytest.fixture
def client(hub):
    runtime = RuntimeClient(python=RUNTIME)  # a fresh child per test, with the hub's settings
    yield runtime
    runtime.close()


def settings(**changes):
    base = dict(backend="llama.cpp", server_url="", server_model="", cache_dir="", mmproj="",
                threads=2, gpu_layers=-1, device="auto")
    return SimpleNamespace(**{**base, **changes})


def wait_for(condition, timeout: float = 300.0, why=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting {why()}")
        QgsApplication.processEvents()
        time.sleep(0.02)


def dialog_for(client, cache_dir: str = "", on_ready=lambda _name: None) -> GetModelDialog:
    """The dialog as the dock opens it (its Get... button) once the model list is in."""
    model_choice.fetch_rows(client, cache_dir)
    dialog = open_get_dialog("geochat-7b", cache_dir, None, on_ready, client)
    assert dialog.isVisible()
    wait_for(lambda: "Checking" not in dialog.plan_label.text())
    return dialog


def choose(dialog: GetModelDialog, target: str, quant) -> None:
    index = next(i for i in range(dialog.choice_combo.count())
                 if tuple(dialog.choice_combo.itemData(i)) == (target, quant))
    dialog.choice_combo.setCurrentIndex(index)
    wait_for(lambda: "Checking" not in dialog.plan_label.text())


def start_stalled_get(client, hub, tmp_path) -> tuple[GetModelDialog, Path, int]:
    """A Get (HF) whose shard 1 stops half way (the hub waits for ``hub.release``): the
    dialog, the partial file (some bytes in it) and the half."""
    dialog = dialog_for(client)
    choose(dialog, "hf", None)
    half = len(hub.repos[GEOCHAT_REPO].files[SHARD_1]) // 2
    hub.stall_after[(GEOCHAT_REPO, SHARD_1)] = half
    dialog.get_button.click()
    part = tmp_path / "models" / "models" / "geochat-7b" / (SHARD_1 + ".part")
    wait_for(lambda: part.is_file() and part.stat().st_size > 0, 120)
    return dialog, part, half


def resumed_from(hub) -> list[str]:
    """The Range headers shard 1 was asked for (since ``hub.requests`` was cleared)."""
    return [r for _, p, r in hub.weight_requests() if p.endswith(SHARD_1)][:1]


def get(dialog: GetModelDialog) -> None:
    dialog.get_button.click()
    assert dialog.busy
    wait_for(lambda: not dialog.busy)


def test_get_ends_with_a_ready_model_whose_results_carry_provenance(
        client, hub, tmp_path, demo_raster, qgis_new_project):
    before = set(sys.modules)
    ready: list[str] = []
    dialog = dialog_for(client, on_ready=ready.append)
    assert "GB" in dialog.takes_label.text() and "gguf q4_k_m" in dialog.takes_label.text()
    assert dialog.choice_combo.count() == 4 and "llama.cpp" in dialog.choice_combo.itemText(0)
    assert "to download" in dialog.plan_label.text() and "free in" in dialog.plan_label.text()
    status, _ = model_choice.model_status("geochat-7b", settings())
    assert status == model_choice.MISSING
    choose(dialog, "gguf", "f16")
    get(dialog)
    assert ready == ["geochat-7b"], dialog.status_label.text()
    assert "ready" in dialog.status_label.text()
    assert set(dialog.bars) >= {"download", "convert", "verify"}
    assert all(bar.value() == 1000 for _text, bar in dialog.bars.values())
    assert " of " in dialog.bars["download"][0].text()
    model_choice.fetch_rows(client)
    assert model_choice.model_status("geochat-7b", settings())[0] == model_choice.READY

    out = tmp_path / "cars.gpkg"
    ran = client.run({"raster": str(demo_raster), "task": "refer", "prompts": ["car"],
                      "model": model_choice.model_request("geochat-7b", settings()),
                      "tiling": {"tile_size": 504, "overlap": 0},
                      "options": {"max_new_tokens": 30, "grammar": True},
                      "output": {"path": str(out), "layer": "cars"}})
    assert ran.complete and ran.features > 0, ran
    layer = QgsVectorLayer(f"{ran.output}|layername={ran.layer}", "GeoChat cars", "ogr")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    assert QgsProject.instance().mapLayersByName("GeoChat cars")
    features = list(layer.getFeatures())
    assert len(features) == ran.features > 0
    for feature in features:
        assert feature["model_src"] == GEOCHAT_REPO and feature["model_rev"] == "a" * 40
        assert feature["quant"] == "f16" and len(feature["model_hash"]) == 64
        assert "geochat" in feature["converter"]

    wait_for(lambda: dialog.delete_button.isVisibleTo(dialog))
    assert "frees" in dialog.delete_button.text()
    dialog.delete_button.click()
    wait_for(lambda: not dialog.delete_button.isVisibleTo(dialog))
    assert "Deleted the original checkpoint" in dialog.status_label.text()
    assert not (tmp_path / "models" / "models" / "geochat-7b").exists()
    assert client.model_status({"model": model_choice.model_request("geochat-7b", settings())})["ready"]
    assert not [m for m in set(sys.modules) - before if m.split(".")[0] in HEAVY]


def test_cancel_during_download_keeps_the_bytes_and_get_resumes(client, hub, tmp_path):
    dialog, part, half = start_stalled_get(client, hub, tmp_path)
    dialog.cancel_button.click()
    hub.release.set()
    wait_for(lambda: not dialog.busy, 120)
    assert "Cancelled" in dialog.status_label.text(), dialog.status_label.text()
    assert part.stat().st_size == half and dialog.get_button.isEnabled()
    hub.stall_after.clear()
    hub.requests.clear()
    dialog.refresh_plan()
    wait_for(lambda: "Checking" not in dialog.plan_label.text())
    assert "resumes" in dialog.plan_label.text(), dialog.plan_label.text()
    get(dialog)
    assert dialog.result is not None, dialog.status_label.text()
    assert resumed_from(hub) == [f"bytes={half}-"]


def test_cancel_during_conversion_leaves_no_model_and_no_temporary_files(client, hub, tmp_path):
    dialog = dialog_for(client)
    choose(dialog, "gguf", "q8_0")
    dialog.get_button.click()
    task = dialog.task

    def stop_once_downloaded(event):  # on the worker: the cancel reaches the child at once
        if event.get("phase") in ("convert", "quantize") or (
                event.get("phase") == "download" and event.get("done") == event.get("total")):
            task.stop.set()

    task.progressed.connect(stop_once_downloaded, Qt.ConnectionType.DirectConnection)
    wait_for(lambda: not dialog.busy)
    text = dialog.status_label.text()
    assert "Cancelled during convert" in text or "Cancelled during quantize" in text, text
    assert dialog.result is None
    converted = tmp_path / "models" / "converted" / "geochat-7b"
    assert not converted.exists() or list(converted.iterdir()) == []
    assert not list((tmp_path / "models" / "models").rglob("*.part"))
    assert model_choice.fetch_rows(client) and \
        model_choice.model_status("geochat-7b", settings())[0] == model_choice.MISSING


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount")
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                         capture_output=True, text=True)
    if run.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    yield folder
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_is_refused_before_any_byte(client, hub, small_disk):
    dialog = dialog_for(client, str(small_disk))
    assert "Not enough free disk space" in dialog.plan_label.text(), dialog.plan_label.text()
    hub.requests.clear()
    get(dialog)
    assert dialog.status_label.text().count("Not started: Not enough free disk space") == 1
    # only the configs are read (into memory, for the sizes); no weight, nothing written
    assert all(p.endswith("config.json") for _, p, _ in hub.weight_requests())
    assert list(small_disk.iterdir()) == []


def test_a_missing_shard_gives_a_clear_message(client, hub, tmp_path):
    del hub.repos[GEOCHAT_REPO].files[SHARD_2]
    dialog = dialog_for(client)
    get(dialog)
    message = dialog.status_label.text()
    assert GEOCHAT_REPO in message and SHARD_2 in message, message
    assert dialog.result is None
    assert all(p.endswith("config.json") for _, p, _ in hub.weight_requests())


def test_downloads_go_through_qgis_proxy_settings(client, hub):
    from qgis.core import QgsSettings

    settings = QgsSettings()
    values = {"proxy/proxyEnabled": True, "proxy/proxyType": "HttpProxy",
              "proxy/proxyHost": "127.0.0.1", "proxy/proxyPort": str(hub.server_address[1]),
              "proxy/proxyUser": "ana", "proxy/proxyPassword": "s3cret"}
    try:
        for key, value in values.items():
            settings.setValue(key, value)
        model_choice.fetch_rows(client)
        row = model_choice.remembered("geochat-7b")
        # a hub name only the proxy can reach (127.0.0.1 itself is always reached directly)
        dialog = GetModelDialog(row, client, endpoint="http://models.example.invalid")
        wait_for(lambda: "Checking" not in dialog.plan_label.text())
        choose(dialog, "gguf", "f16")
        get(dialog)
        assert dialog.result is not None, dialog.status_label.text()
    finally:
        for key in values:
            settings.remove(key)
    assert any(url.endswith(SHARD_2) for url in hub.proxied), hub.proxied
    assert all(url.startswith("http://models.example.invalid/") for url in hub.proxied)
    assert hub.proxy_auth and set(hub.proxy_auth) == {"Basic YW5hOnMzY3JldA=="}


def test_too_little_memory_offers_to_go_ahead_anyway(client, hub):
    dialog = dialog_for(client)
    assert dialog.memory_box.isHidden() and "ignore_memory" not in dialog.options()
    short = {"memory_available": 1 << 30, "memory_needed": 3 << 30, "installed": None,
             "problems": ["The conversion needs about 3.2 GB of memory, 1.1 GB is available."]}
    dialog.show_plan(short)  # what the plan says on a 1 GB machine
    assert not dialog.memory_box.isHidden() and "1.1 GB" in dialog.plan_label.text()
    dialog.memory_box.setChecked(True)  # asks the runtime for the plan again, going ahead
    assert dialog.options()["ignore_memory"] is True
    wait_for(lambda: "Checking" not in dialog.plan_label.text())
    assert "to download" in dialog.plan_label.text()  # this machine has the memory


def test_a_get_cut_by_quitting_qgis_resumes_in_the_next_session(hub, tmp_path):
    first = RuntimeClient(python=RUNTIME)
    try:
        dialog, part, half = start_stalled_get(first, hub, tmp_path)
        first.close(timeout=1)  # QGIS quits: the runtime child goes with it, mid-download
        hub.release.set()
        wait_for(lambda: not dialog.busy, 60)
        assert dialog.result is None and dialog.status_label.text()
        assert part.stat().st_size == half
    finally:
        hub.release.set()
        first.close()
    hub.stall_after.clear()
    hub.requests.clear()
    second = RuntimeClient(python=RUNTIME)  # the next QGIS session
    try:
        dialog = dialog_for(second)
        choose(dialog, "hf", None)
        assert "resumes" in dialog.plan_label.text(), dialog.plan_label.text()
        get(dialog)
        assert dialog.result is not None, dialog.status_label.text()
    finally:
        second.close()
    assert resumed_from(hub) == [f"bytes={half}-"]


def test_the_dock_gets_geochat_with_its_get_button_then_finds_objects_with_it(
        hub, tmp_path, demo_raster, qgis_iface, qgis_new_project):
    from qgis.core import QgsRasterLayer

    from geochat_qgis.client import close_shared_client
    from geochat_qgis.gui import area as areas
    from geochat_qgis.gui.dock import GeoChatDock

    close_shared_client()  # the dock's runtime child starts with the hub's settings
    model_choice.remember_rows([])
    raster = QgsRasterLayer(str(demo_raster), "cogeo")
    QgsProject.instance().addMapLayer(raster)
    qgis_iface.setActiveLayer(raster)
    dock = GeoChatDock(qgis_iface)
    try:
        dock.settings.backend, dock.settings.cache_dir = "llama.cpp", ""
        dock.settings.max_new_tokens, dock.settings.ask_above_seconds = 30, 1e9
        index = dock.model_combo.findData("geochat-7b")
        assert index >= 0, "GeoChat-7B is not in the dock's model list"
        dock.model_combo.setCurrentIndex(index)
        dock.refresh_model_status()  # listed by the runtime in the background
        wait_for(lambda: "not downloaded" in dock.status_label.text(), 120)
        assert "GB" in dock.status_label.text() and not dock.download_button.isHidden()
        note = dock.model_combo.itemData(index, Qt.ItemDataRole.ToolTipRole)
        assert note.startswith("runs here with llama.cpp") and "getting it" in note, note
        dock.download_button.click()
        dialog = dock._get_dialog
        assert dialog.isVisible()
        wait_for(lambda: "Checking" not in dialog.plan_label.text())
        choose(dialog, "gguf", "f16")
        get(dialog)
        assert dialog.result is not None, dialog.status_label.text()
        wait_for(lambda: dock.status_label.text().startswith('<span style="color:#2e7d32">ready'), 120)
        assert dock.download_button.isHidden()

        before = set(QgsProject.instance().mapLayers())
        dock.task_combo.setCurrentIndex(dock.task_combo.findData("refer"))
        dock.area_combo.setCurrentIndex(dock.area_combo.findData(areas.LAYER))
        dock.prompt_edit.setText("car")
        dock.send()
        added = lambda: [layer for key, layer in QgsProject.instance().mapLayers().items()  # noqa: E731
                         if key not in before and isinstance(layer, QgsVectorLayer)]
        wait_for(lambda: added() and not dock.runner.busy, 300, lambda: dock.chat.messages[-4:])
        layer = added()[0]
        features = list(layer.getFeatures())
        assert features, dock.chat.messages[-3:]
        assert {(f["model_src"], f["model_rev"], f["quant"]) for f in features} == {
            (GEOCHAT_REPO, "a" * 40, "f16")}
    finally:
        dock.cleanup()
        dock.deleteLater()
        close_shared_client()
        model_choice.remember_rows([])
        QgsProject.instance().removeAllMapLayers()


def test_a_runtime_that_cannot_convert_offers_the_installer(client, hub):
    dialog = dialog_for(client)
    assert dialog.install_button.isHidden()  # this runtime converts GeoChat: nothing to install
    # a runtime without the llama.cpp packages: the GGUF needs those (no torch, under 1 GB)
    dialog.show_plan({"target": "gguf", "conversion_missing": ["gguf"], "installed": None,
                      "problems": ["Converting needs gguf, not installed here."]})
    assert not dialog.install_button.isHidden() and dialog.converter_backend == "llama.cpp"
    label = dialog.install_button.text()
    assert "llama.cpp packages" in label and "torch" not in label and " MB)" in label, label
    dialog.show_plan({"target": "hf", "conversion_missing": ["transformers"], "installed": None,
                      "problems": ["Converting needs transformers, not installed here."]})
    assert "transformers packages" in dialog.install_button.text()
    dialog.install_button.click()
    installer = dialog.deps_dialog
    assert installer.isVisible() and installer.backend == "transformers"
    installer.reject()  # closed without installing: the plan is asked again
    assert "Checking" in dialog.plan_label.text()
    wait_for(lambda: "Checking" not in dialog.plan_label.text())
    assert dialog.install_button.isHidden() and "to download" in dialog.plan_label.text()
