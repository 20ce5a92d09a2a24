"""The runtime client: real child processes (the project's .venv Python) running real jobs.

Models: the tiny GeoChat GGUF through llama.cpp, and the OpenAI-HTTP backend against a streaming
chat server on 127.0.0.1 (answers as slow as a test needs, and requests a test can fail or use
to kill the child).
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyogrio
import pytest
import rasterio
import shapely
from chat_server import serve_chat

from geochat_qgis.client import RuntimeClient, RuntimeClientError, RuntimeMissing, runtime_state
from geochat_qgis.core.jobs import build_job
from geochat_qgis.core.tiling import plan_tiles

pytestmark = pytest.mark.slow
chat = pytest.fixture(serve_chat)
ROOT = Path(__file__).resolve().parents[2]
BOX = "{<10><10><40><40>|<0>}"


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOCHAT_DEPS_DIR", str(tmp_path / "data"))
    runtime = RuntimeClient(python=sys.executable, heartbeat_interval=0.2, heartbeat_timeout=10,
                            cancel_grace=5.0)
    yield runtime
    runtime.close()
    zombies = [p.pid for p in psutil.Process().children(recursive=True)
               if p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []


def http_request(chat, raster, output: Path, **changes) -> dict:
    request = {
        "raster": str(raster), "task": "refer", "prompts": ["car"],
        "model": {"backend": "openai", "server_url": chat.base_url, "server_model": "tiny",
                  "max_in_flight": 1, "settings": {"retries": 0}},
        "tiling": {"tile_size": 256, "overlap": 0}, "output": {"path": str(output)},
    }
    request.update(changes)
    return request


def features(path) -> list[tuple[str, str]]:
    """(label, geometry WKT to 6 decimals) of every feature, sorted."""
    _meta, _fids, geometry, fields = pyogrio.raw.read(str(path))
    labels = fields[0]
    return sorted((str(label), shapely.to_wkt(shapely.from_wkb(g), rounding_precision=6))
                  for label, g in zip(labels, geometry))


def test_plan_footprints_match_the_core_plan(client, data_dir):
    for name in ("RGB.byte.tif", "cogeo.tif", "rgb1_fake_nir_epsg3857.tif"):
        raster = data_dir / name
        request = {"raster": str(raster), "task": "refer", "family": "geochat",
                   "tiling": {"tile_size": 128, "overlap": 0.2}}
        planned = client.plan(request)
        job = build_job({**request, "model": {"backend": "openai", "server_url": "http://x",
                                              "server_model": "m"}})
        core = plan_tiles(raster, job.tile_spec)
        assert planned.tiles == len(core) == len(planned.footprints_wkt) > 1
        assert planned.tile_size == 128 and planned.tiled
        ours = [shapely.from_wkt(w) for w in planned.footprints_wkt]
        assert all(a.equals_exact(t.footprint, 1e-6) for a, t in zip(ours, core.tiles))
        with rasterio.open(raster) as ds:
            assert planned.gsd_m == pytest.approx(core.native_gsd_m) and ds.crs is not None


def test_plan_reprojects_footprints_and_explains_questions(client, demo_raster):
    request = {"raster": str(demo_raster), "task": "refer", "family": "geochat",
               "output": {"crs": "EPSG:4326"}}
    planned = client.plan(request)
    lon, lat = shapely.from_wkt(planned.footprints_wkt[0]).centroid.coords[0]
    assert -180 <= lon <= 180 and -90 <= lat <= 90 and "WGS 84" in planned.crs_wkt
    assert planned.message.startswith(f"{planned.tiles} tile(s) of 504 px")
    chat_plan = client.plan({**request, "task": "chat"})
    assert chat_plan.tiles == 1 and not chat_plan.tiled
    assert "downsampled to one 504 px tile" in chat_plan.message
    with pytest.raises(RuntimeClientError, match="misses the raster") as error:
        client.plan({**request, "extent": [0, 0, 1, 1], "extent_crs": "EPSG:4326"})
    assert error.value.kind == "RasterError" and not error.value.crashed


def test_run_over_http_streams_events_and_writes_the_geopackage(client, chat, demo_raster,
                                                                 tmp_path):
    chat.tokens = [BOX[:8], BOX[8:]]
    events: list[dict] = []
    result = client.run(http_request(chat, demo_raster, tmp_path / "cars.gpkg"), events.append)
    assert result.complete and result.tiles_done == result.tiles_planned == 16
    assert result.output == str(tmp_path / "cars.gpkg") and result.features == 16
    assert result.counts == {"car": 16} and len(features(result.output)) == 16
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1] == {"type": "progress", "done": 16, "total": 16, "detections": 16}
    tokens = [e for e in events if e["type"] == "token"]
    assert len(tokens) == 32 and {t["text"] for t in tokens} == {BOX[:8], BOX[8:]}
    assert sorted({t["tile"] for t in tokens}) == list(range(16))
    assert not list(tmp_path.glob(".*partial*"))  # the checkpoint is gone after a clean run
    pid = client.pid
    again = client.run(http_request(chat, demo_raster, tmp_path / "again.gpkg"), events.append)
    assert again.features == 16 and client.pid == pid  # same child, the model stayed loaded
    loading = [e for e in events if e["type"] == "status"]
    assert len(loading) == 1


def test_a_bad_output_is_refused_before_any_tile(client, chat, demo_raster, tmp_path):
    for bad, reason in ((tmp_path / "no" / "cars.gpkg", "does not exist"),
                        (tmp_path / "cars.txt", "use a .shp, .gpkg or .geojson")):
        with pytest.raises(RuntimeClientError, match=reason) as error:
            client.run(http_request(chat, demo_raster, bad))
        assert error.value.kind == "ExportError"
    assert chat.bodies == []  # no tile was sent to the model


def test_cancel_mid_run_writes_the_finished_tiles(client, chat, demo_raster, tmp_path):
    chat.tokens, chat.delay = [BOX], 0.3
    cancel = threading.Event()

    def on_event(event: dict) -> None:
        if event["type"] == "progress" and event["done"] == 3:
            cancel.set()

    result = client.run(http_request(chat, demo_raster, tmp_path / "part.gpkg"), on_event, cancel)
    assert result.cancelled and result.error is None
    assert 3 <= result.tiles_done < 16 and result.features == result.tiles_done
    assert len(features(tmp_path / "part.gpkg")) == result.tiles_done


def test_a_cancelled_run_never_replaces_an_existing_output(client, chat, demo_raster,
                                                           tmp_path):
    chat.tokens = [BOX]
    target = tmp_path / "cars.gpkg"
    assert client.run(http_request(chat, demo_raster, target)).features == 16
    chat.delay = 0.2
    cancel = threading.Event()
    result = client.run(http_request(chat, demo_raster, target),
                        lambda e: cancel.set() if e["type"] == "progress" else None, cancel)
    assert result.cancelled and result.output != str(target)
    assert "-partial-" in result.output and "was kept" in result.note
    assert len(features(target)) == 16 and len(features(result.output)) == result.tiles_done


def test_sigkill_mid_run_keeps_finished_tiles_and_the_next_request_works(client, chat,
                                                                        demo_raster, tmp_path):
    chat.tokens = [BOX]
    client.ping()
    victim = client.pid

    def kill_on_sixth_request(count: int) -> None:
        if count == 6:
            os.kill(victim, signal.SIGKILL)

    chat.on_request = kill_on_sixth_request
    result = client.run(http_request(chat, demo_raster, tmp_path / "kept.gpkg"))
    assert result.crashed and not result.complete
    assert "killed (SIGKILL), likely out of memory" in result.error
    assert "next request starts a fresh runtime" in result.error
    assert 4 <= result.tiles_done <= 6 and result.output == str(tmp_path / "kept.gpkg")
    assert len(features(result.output)) == result.features == result.tiles_done
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() != "zombie"
    chat.on_request = None
    again = client.run(http_request(chat, demo_raster, tmp_path / "next.gpkg"))
    assert again.complete and again.features == 16 and client.pid != victim


def test_failed_tiles_are_reported_and_the_run_goes_on(client, chat, demo_raster, tmp_path):
    chat.tokens = [BOX]

    def drop_second(count: int) -> None:
        if count == 2:
            raise ConnectionAbortedError("the server drops this request")

    chat.on_request = drop_second
    events: list[dict] = []
    result = client.run(http_request(chat, demo_raster, tmp_path / "some.gpkg"), events.append)
    failed = [e for e in events if e["type"] == "tile_failed"]
    assert len(failed) == 1 and failed[0]["prompt"] == "car" and failed[0]["message"]
    assert result.tiles_failed == 1 and result.failures[0]["tile"] == failed[0]["tile"]
    assert result.tiles_done == 15 and result.features == 15 and result.complete


def test_ask_writes_its_boxes_georeferenced(client, chat, demo_raster, tmp_path):
    chat.tokens = [BOX]
    request = http_request(chat, demo_raster, tmp_path / "ask.gpkg", task="refer",
                           question="car")
    request["output"]["crs"] = "EPSG:4326"
    answer = client.ask(request)
    assert answer.raw == BOX and answer.features == 1 and answer.counts == {"car": 1}
    assert answer.user_text == "[refer] Give me the location of <p> car </p>"
    assert "downsampled to one 256 px tile" in answer.how
    (label, wkt), = features(answer.output)
    with rasterio.open(demo_raster) as ds:
        from rasterio.warp import transform_bounds

        west, south, east, north = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    lon, lat = shapely.from_wkt(wkt).centroid.coords[0]
    assert label == "car" and west < lon < east and south < lat < north
    chat.tokens = ["no boxes here"]
    assert client.ask(request).output is None


def test_light_requests_are_answered_while_a_run_goes_on(client, chat, demo_raster, tmp_path):
    chat.tokens, chat.delay = [BOX], 0.15
    started = threading.Event()
    answers: dict[str, float] = {}

    def on_event(event: dict) -> None:
        if event["type"] == "progress":
            started.set()

    def light() -> None:
        started.wait(30)
        answers["plan"] = client.plan({"raster": str(demo_raster), "family": "geochat"}).tiles
        answers["status"] = bool(client.status()["backends"]["openai"])
        answers["at"] = time.monotonic()

    helper = threading.Thread(target=light)
    helper.start()
    client.run(http_request(chat, demo_raster, tmp_path / "slow.gpkg"), on_event)
    finished = time.monotonic()
    helper.join(30)
    assert answers["plan"] >= 1 and answers["status"] is True
    assert answers["at"] < finished - 0.5  # answered during the run, not after it


def test_export_copies_a_result_layer_to_other_formats(client, chat, demo_raster, tmp_path):
    chat.tokens = [BOX]
    result = client.run(http_request(chat, demo_raster, tmp_path / "cars.gpkg"))
    for name in ("cars.shp", "cars.geojson", "copy.gpkg"):
        written = client.export(result.output, result.layer, str(tmp_path / name))
        assert written["features"] == 16
        assert features(written["output"]) == features(result.output)
    with pytest.raises(RuntimeClientError, match="cannot read"):
        client.export(str(tmp_path / "none.gpkg"), None, str(tmp_path / "x.geojson"))


def test_runtime_missing_says_what_to_install(tmp_path, monkeypatch):
    bare = tmp_path / "bare"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(bare)], check=True)
    monkeypatch.setenv("GEOCHAT_RUNTIME_PYTHON", str(bare / "bin" / "python"))
    state = runtime_state(refresh=True)
    assert not state.ready and "numpy" in state.missing and "geochat_qgis" not in state.missing
    assert "Install model dependencies" in state.message
    client = RuntimeClient()
    with pytest.raises(RuntimeMissing, match="lacks numpy.*Install model dependencies"):
        client.plan({"raster": "x.tif"})
    assert client.pid is None
    monkeypatch.setenv("GEOCHAT_RUNTIME_PYTHON", "/usr/bin/python3 -I")  # no PYTHONPATH at all
    isolated = runtime_state(refresh=True)
    assert not isolated.ready and "geochat_qgis" in isolated.missing
    monkeypatch.setenv("GEOCHAT_RUNTIME_PYTHON", str(tmp_path / "nothing" / "python"))
    with pytest.raises(RuntimeMissing, match="cannot be started"):
        RuntimeClient().status()


def test_without_the_variable_the_managed_environment_runs_the_child(tmp_path, monkeypatch):
    from geochat_qgis.client import runtime_command
    from geochat_qgis.core.deps.environment import ManagedEnv

    monkeypatch.delenv("GEOCHAT_RUNTIME_PYTHON", raising=False)
    monkeypatch.setenv("GEOCHAT_DEPS_DIR", str(tmp_path / "deps"))
    assert runtime_command() is None
    with pytest.raises(RuntimeMissing, match="runtime is not installed.*Install model depend"):
        RuntimeClient().plan({"raster": "x.tif"})
    managed = ManagedEnv.default()
    managed.python.parent.mkdir(parents=True)
    managed.python.symlink_to(sys.executable)
    assert runtime_command() == [str(managed.python)]


def test_the_client_imports_only_the_standard_library(tmp_path):
    """In a bare ``python -I -S`` (the standard library only: no site packages): import the
    client, check the runtime, plan through a real child, and list what got imported."""
    script = f"""
import json, sys
before = set(sys.modules)
sys.path.insert(0, {str(ROOT)!r})
from geochat_qgis.client import RuntimeClient, runtime_state, shared_client
assert runtime_state().ready, runtime_state()
plan = shared_client().plan({{"raster": {str(ROOT / 'tests/data/RGB.byte.tif')!r},
                             "family": "geochat"}})
assert plan.tiles == 4, plan
print(json.dumps(sorted(set(sys.modules) - before)))
"""
    env = dict(os.environ, GEOCHAT_RUNTIME_PYTHON=sys.executable,
               GEOCHAT_DEPS_DIR=str(tmp_path))
    done = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", script], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    import json

    loaded = {name.split(".")[0] for name in json.loads(done.stdout)}
    assert loaded - set(sys.stdlib_module_names) == {"geochat_qgis"}
    ours = {n for n in json.loads(done.stdout) if n.startswith("geochat_qgis.")}
    assert ours <= {"geochat_qgis.client", "geochat_qgis.client.errors",
                    "geochat_qgis.client.locate", "geochat_qgis.client.results",
                    "geochat_qgis.client.process", "geochat_qgis.client.runtime_client",
                    "geochat_qgis.core", "geochat_qgis.core.deps", "geochat_qgis.core.errors",
                    "geochat_qgis.core.deps.environment"}, ours


def test_a_silent_child_counts_as_hung_and_its_tiles_are_kept(chat, demo_raster, tmp_path):
    runtime = RuntimeClient(python=sys.executable, heartbeat_interval=0.2,
                            heartbeat_timeout=1.5)
    chat.tokens = [BOX]
    frozen: list[int] = []

    def freeze_on_fifth(count: int) -> None:
        if count == 5:
            frozen.append(runtime.pid)
            os.kill(runtime.pid, signal.SIGSTOP)  # alive, but no heartbeat any more

    chat.on_request = freeze_on_fifth
    try:
        result = runtime.run(http_request(chat, demo_raster, tmp_path / "hung.gpkg"))
        assert result.crashed and "stopped answering (no heartbeat for 1.5 s)" in result.error
        assert 3 <= result.tiles_done <= 5 and result.features == result.tiles_done
        with pytest.raises(ChildProcessError):
            os.waitpid(frozen[0], os.WNOHANG)  # killed and reaped
    finally:
        runtime.close()


def test_the_child_exits_when_its_parent_dies(tmp_path):
    """A parent killed outright (QGIS crashing) leaves no orphan: the child's stdin ends."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from geochat_qgis.client import RuntimeClient
client = RuntimeClient(python={sys.executable!r})
client.ping()
print(client.pid, flush=True)
sys.stdin.read()
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.is_running()
        parent.kill()
        parent.wait()
        child.wait(timeout=30)  # it went by itself: nobody killed it
    finally:
        parent.kill()
        parent.wait()


def test_close_during_a_run_stops_it_and_keeps_the_finished_tiles(client, chat, demo_raster,
                                                                  tmp_path):
    chat.tokens, chat.delay = [BOX], 0.2
    outcome: dict = {}

    def on_event(event: dict) -> None:
        if event["type"] == "progress" and event["done"] == 2:
            threading.Thread(target=client.close).start()  # as the plugin unloading

    def run() -> None:
        outcome["result"] = client.run(http_request(chat, demo_raster, tmp_path / "u.gpkg"),
                                       on_event)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(60)
    result = outcome["result"]
    assert result.cancelled and 2 <= result.tiles_done < 16
    assert len(features(result.output)) == result.tiles_done
    time.sleep(0.5)
    assert client.pid is None  # nothing was restarted behind the close


def test_status_says_what_the_runtime_has(client):
    import numpy

    from geochat_qgis.__about__ import version

    status = client.status(deep=True)
    assert status["geochat"] == version() and status["python"] == sys.executable
    assert status["versions"]["numpy"] == numpy.__version__
    assert status["backends"]["openai"] is True and status["loaded"] is None
    has_llama = importlib.util.find_spec("llama_cpp") is not None
    assert status["backends"]["llama.cpp"] is has_llama
    assert isinstance(status["gpus"], list) and status["import_errors"] == {}
    with_llama = runtime_state(sys.executable, backend="llama.cpp", refresh=True)
    assert with_llama.ready is has_llama
    assert with_llama.ready or with_llama.missing == ["llama_cpp"]


def test_close_stops_the_child_and_the_next_request_starts_one(client):
    client.ping()
    first = client.pid
    client.close()
    assert client.pid is None
    with pytest.raises(ChildProcessError):
        os.waitpid(first, os.WNOHANG)  # reaped: not our child any more
    assert client.ping() < 30 and client.pid != first
