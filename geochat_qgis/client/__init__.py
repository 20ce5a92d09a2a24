"""The GeoChat runtime client: the core's jobs in a child process, for QGIS's process.

STANDARD LIBRARY ONLY: QGIS's process never imports numpy, shapely, rasterio, pyproj, pyogrio,
PIL, torch, transformers, llama_cpp or gguf; the child (``<runtime python> -m geochat_qgis
runtime serve``) does. Requests are plain JSON dicts of the user's choices, resolved by
``core/jobs.py`` (``build_job`` / ``build_chat``) in the child::

    raster, task, prompts [str], question, history [[user_text, raw]], classes [str],
    region_wkt, region_crs, extent [xmin, ymin, xmax, ymax], extent_crs, aoi_wkt [wkt...],
    aoi_crs, aoi_path, model {name, backend, model_path, mmproj_path, server_url, server_model,
    api_key, device, n_threads, n_gpu_layers, kv_f32, cache_dir, target, quant,
    settings {...}},
    family (optional: from the model), tiling {tile_size (None: the family's), overlap, gsd,
    bands}, output {path, layer, crs}, options {max_new_tokens, temperature, grammar,
    iou_threshold, angle_convention, max_consecutive_failures, run_id (letters, digits, '_',
    '-'; ``run`` makes one when none is given: it names the run's checkpoint)}

CRS values are WKT or "EPSG:n". ``model.name``: a catalog name (a converted one, e.g.
geochat-7b after get_model, is found by ``model.target``/``model.quant``, else the default
choice), or "tiny-demo", the demo model (built on first use).

API::

    client = shared_client()             # or RuntimeClient(python=None, env=None)
    runtime_state(backend=None) -> RuntimeState(ready, python, missing, message)  # no child
    client.plan(request) -> PlanResult(tiles, skipped, footprints_wkt, crs_wkt, tile_size,
                                       gsd_m, message, family, tiled)
    client.run(request, on_event=None, cancel=None) -> RunResult(output, layer, features,
        tiles_done, tiles_failed, tiles_planned, cancelled, error, failures, answers, counts,
        crs_wkt, seconds, tiles_skipped, model, run_id, generated_tokens, crashed)
    client.ask(request, on_event=None, cancel=None) -> AskResult(text, user_text, how, output,
        features, seconds, prompt_tokens, generated_tokens, raw, layer, counts, crs_wkt,
        problems, model)
    client.model_status(request) -> dict(ready, message, kind, family, model, loaded, missing)
    client.get_model(model_id, options=None, on_event=None, cancel=None) -> dict
    client.model_list(cache_dir=None) -> [dict(name, title, family, status, download_bytes,
        memory_needed, needs_conversion, requires, choices [{target, quant, bytes, backends,
        not_here, installed}])]                   # the dock's list (gui/model_choice.py)
    client.plan_get(model_id, options=None) -> dict(ok, problems, download_bytes, disk_needed,
        disk_free, memory_needed, memory_available, sources, choices, message)
    client.delete_sources(model_id, cache_dir=None, dry_run=False) -> dict(folders, bytes, deleted)
    client.check_model(request) -> dict(ready, message)   # a server is asked for its models
    client.export(source, layer, destination, driver=None) -> dict(output, features)
    client.status(deep=False) -> dict(geochat, python, versions, backends, import_errors,
                                      gpus, loaded)
    client.ping() -> seconds;  client.cancel();  client.close();  client.pid

Events (``on_event(dict)``, called on the requesting thread)::

    {"type": "progress", "done", "total", "detections"}     {"type": "token", "text", "tile"}
    {"type": "tile_failed", "tile", "message", "prompt"}     {"type": "status", "message"}
    {"type": "get_model", "phase", "done", "total", "rate", "eta"}   (get_model; phase
        download | convert | quantize | verify)

``cancel`` is None, a CancelToken-like object (``.cancelled``), a threading.Event or a callable.
A cancelled run keeps (writes) its finished tiles. Errors: RuntimeClientError(message, kind)
(``kind`` the child's error class, e.g. "RasterError"; "RuntimeDied"/"RuntimeHung" when the
child failed), RuntimeMissing (subclass) when no usable runtime is installed. ``run`` raises
only before tiles run; afterwards it returns a RunResult whose ``error``/``cancelled``/
``crashed`` say how it ended (a killed child: "... killed (SIGKILL), likely out of memory ...";
its finished tiles are written by a fresh child). One run writes an output at a time: a second
``run`` to the same ``output.path`` raises RuntimeClientError (kind "OutputBusy") naming the
first one's process. Heavy requests (run, ask, get_model) take
turns; light ones (plan, status, export, model_status, model_list, plan_get, ping) may run
meanwhile. The child keeps the last model loaded between requests.
"""
from .errors import RuntimeClientError, RuntimeMissing
from .locate import RUNTIME_PYTHON_ENV, runtime_command, runtime_state
from .results import AskResult, PlanResult, RunResult, RuntimeState
from .runtime_client import RuntimeClient, close_shared_client, shared_client

__all__ = [
    "AskResult", "PlanResult", "RUNTIME_PYTHON_ENV", "RunResult", "RuntimeClient",
    "RuntimeClientError", "RuntimeMissing", "RuntimeState", "close_shared_client",
    "runtime_command", "runtime_state", "shared_client",
]
