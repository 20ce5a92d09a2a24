"""The runtime's job requests: plan tiles, run a Job into a GeoPackage, recover after a crash,
ask a question. Each takes the request dict and a Context (events, cancel, the loaded model)
and returns a JSON-able dict."""
from __future__ import annotations

import dataclasses
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional, Protocol

from ..backends.base import Backend, CancelToken
from ..backends.factory import BackendSpec
from ..chat import ask as ask_model, overview_plan, region_extent
from ..errors import GeoChatError
from ..export import check_output, export_detections
from ..georef import reproject_geometry, same_crs
from ..jobs import (_catalog_family, _geometry, area, backend_spec, build_chat, build_job,
                    model_provenance, runs_per_tile, tile_spec)
from ..merge import merge_detections
from ..outputs import OutputBusy, Written, hold_output, partial_path, write_result
from ..pipeline import Job, JobResult, Progress, check_run_id, run_job
from ..results import Detection
from ..tiling import plan_tiles
from .checkpoint import Checkpoint, checkpoint_path, read_checkpoint


class Context(Protocol):
    cancel: CancelToken

    def event(self, payload: dict[str, Any]) -> None: ...

    def backend(self, spec: BackendSpec) -> Backend: ...


def _family(request: dict[str, Any]) -> str:
    """The family without loading anything: given, else from the model (its GGUF header or
    the catalog), else GeoChat when the model cannot be resolved (a preview still works)."""
    if request.get("family"):
        return str(request["family"])
    try:
        return backend_spec(request).family
    except GeoChatError:
        return _catalog_family(str((request.get("model") or {}).get("name") or ""))


def plan(request: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The tiles a request would run, footprints as WKT in ``output.crs`` (else the raster's)."""
    raster = request.get("raster")
    if not raster:
        raise GeoChatError("choose a raster layer (the request names no raster)")
    family = _family(request)
    task = str(request.get("task") or "refer")
    extent, extent_crs, aoi = area(request)
    if runs_per_tile(request):
        tiles = plan_tiles(raster, tile_spec(request, family, True), extent=extent,
                           extent_crs=extent_crs, aoi=aoi)
        how = ""
    else:
        if task == "identify" and request.get("region_wkt"):
            extent = region_extent(_geometry(request["region_wkt"]))
            extent_crs = request.get("region_crs") or extent_crs
            aoi = None
        tiles, how = overview_plan(raster, tile_spec(request, family, False), extent,
                                   extent_crs, aoi)
    crs = (request.get("output") or {}).get("crs") or tiles.crs
    footprints = [t.footprint for t in tiles.tiles]
    if crs and tiles.crs and not same_crs(crs, tiles.crs):
        footprints = [reproject_geometry(f, tiles.crs, crs) for f in footprints]
    skipped = sum(t.nodata_frac > tiles.spec.max_nodata for t in tiles.tiles)
    gsd = tiles.native_gsd_m * tiles.scale
    message = how or (f"{len(tiles)} tile(s) of {tiles.spec.tile_size} px at {gsd:.3g} m per "
                      "pixel")
    return {"tiles": len(tiles), "skipped": int(skipped), "footprints_wkt":
            [f.wkt for f in footprints], "tile_ids": [t.tile_id for t in tiles.tiles],
            "crs_wkt": _wkt(crs), "tile_size": tiles.spec.tile_size,
            "gsd_m": gsd, "message": message, "family": family, "tiled": runs_per_tile(request)}


def _wkt(crs: Optional[str]) -> Optional[str]:
    """A CRS as WKT (the client side cannot parse "EPSG:n" without pyproj)."""
    if not crs:
        return None
    from pyproj import CRS

    return CRS.from_user_input(crs).to_wkt()


def _output(request: dict[str, Any], job_id: str) -> tuple[Path, str]:
    """Where the result goes: ``output.path`` (a GeoPackage by default), else a temp file."""
    output = request.get("output") or {}
    if output.get("path"):
        path = Path(output["path"]).expanduser()
    else:
        folder = Path(tempfile.gettempdir()) / "geochat-results"
        folder.mkdir(exist_ok=True)
        path = folder / f"geochat-{job_id}.gpkg"
    return path, str(output.get("layer") or path.stem)


def _counts(detections: list[Detection]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for detection in detections:
        counts[detection.label] = counts.get(detection.label, 0) + 1
    return counts


def _write(detections: list[Detection], path: Path, layer: str, crs: Optional[str],
           provenance: dict[str, Any]) -> str:
    return str(export_detections(detections, path, crs, layer if path.suffix.lower() == ".gpkg"
                                 else None, provenance=provenance))


def run(request: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Run the Job, streaming progress, tokens and tile failures; write the output (also when
    cancelled or stopped by errors: the finished tiles). The output is locked for the whole
    run (a second run writing it is refused at once) and the run checkpoints its finished
    tiles in a file of its own."""
    job = build_job(request)
    path, layer = _output(request, job.run_id)
    check_output(path)  # a bad output never costs a whole run
    with hold_output(path):
        result, written = _run_locked(job, path, layer, request, ctx)
    return {
        "output": str(written.path) if written.path else None, "note": written.note,
        "layer": layer, "features": len(result.detections),
        "tiles_done": result.tiles_done, "tiles_failed": len({f.tile_id for f in result.failures}),
        "tiles_planned": result.tiles_planned, "tiles_skipped": result.tiles_skipped,
        "cancelled": result.cancelled, "error": result.error,
        "failures": [{"tile": f.tile_id, "message": f.message, "prompt": f.prompt}
                     for f in result.failures],
        "answers": [dataclasses.asdict(a) for a in result.answers],
        "counts": _counts(result.detections), "crs_wkt": _wkt(result.crs),
        "seconds": result.seconds, "model": result.model, "run_id": result.run_id,
        "generated_tokens": result.generated_tokens,
    }


def _run_locked(job: Job, path: Path, layer: str, request: dict[str, Any],
                ctx: Context) -> tuple[JobResult, Written]:
    """The run itself, once its output is locked: checkpoint, run, write."""
    assert job.backend is not None
    backend = ctx.backend(job.backend)
    stream = (request.get("options") or {}).get("stream_tokens", True)
    checkpoint = Checkpoint(checkpoint_path(path, job.run_id),
                            {"run_id": job.run_id, "layer": layer})
    finished = [0]

    def on_progress(progress: Progress) -> None:
        checkpoint.add(progress.tile_ids, progress.found, progress.failures, progress.total)
        for failure in progress.failures:
            ctx.event({"type": "tile_failed", "tile": failure.tile_id,
                       "message": failure.message, "prompt": failure.prompt})
        finished[0] = progress.done
        ctx.event({"type": "progress", "done": progress.done, "total": progress.total,
                   "detections": progress.detections})

    def on_token(index: int, text: str) -> None:
        ctx.event({"type": "token", "text": text, "tile": finished[0] + index})

    try:
        result = run_job(job, backend, on_progress=on_progress, cancel=ctx.cancel,
                         on_token=on_token if stream else None)
        # the core's one rule: an existing output is replaced only by a complete run
        written = write_result(result, path, layer, _provenance(job))
    finally:
        checkpoint.close(remove=True)
    return result, written


def _provenance(job) -> dict[str, Any]:
    return {"task": job.task, "raster": job.raster, "run_id": job.run_id,
            **model_provenance(job.backend)}


def recover(request: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """After the runtime died mid-run: merge and write what that run's own checkpoint holds
    (``options.run_id`` names it). Its output when free, else beside it (another run holds
    it: started after the death)."""
    run_id = (request.get("options") or {}).get("run_id")
    if not run_id:
        raise GeoChatError("recover needs the killed run's options.run_id: its finished tiles "
                           "are kept in a file named by it")
    run_id = check_run_id(run_id)
    path, layer = _output(request, "recovered")
    saved = checkpoint_path(path, run_id)
    found = read_checkpoint(saved)
    failed = {f["tile"] for f in found.failures}
    done = len(set(found.tiles) - failed)
    iou = float((request.get("options") or {}).get("iou_threshold", 0.5))
    detections = merge_detections(found.detections, iou) if found.detections else []
    crs = (request.get("output") or {}).get("crs") or found.crs
    stopped = JobResult(run_id, "", crs, detections, tiles_planned=found.total, tiles_done=done,
                        error="the runtime process died")
    provenance = {"task": request.get("task"), "raster": request.get("raster"),
                  **_request_provenance(request)}
    try:
        lock, target, busy = hold_output(path), path, ""
    except OutputBusy as exc:
        lock, target, busy = None, partial_path(path, run_id), f"; {exc.args[0].split(';')[0]}"
    try:
        written = write_result(stopped, target, layer, provenance)
    finally:
        if lock is not None:
            lock.release()
    saved.unlink(missing_ok=True)
    return {"output": str(written.path) if written.path else None, "note": written.note + busy,
            "layer": layer, "features": len(detections), "tiles_done": done,
            "tiles_failed": len(failed), "tiles_planned": found.total,
            "failures": found.failures, "counts": _counts(detections),
            "crs_wkt": _wkt(found.crs), "run_id": run_id}


def _request_provenance(request: dict[str, Any]) -> dict[str, str]:
    try:
        return model_provenance(backend_spec(request))
    except GeoChatError:
        return {}


def ask(request: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """One question about the request's extent; boxes/masks written when there are any."""
    spec = backend_spec(request)
    chat = build_chat(request, spec)
    backend = ctx.backend(dataclasses.replace(spec, family=chat.family))
    reply = ask_model(chat, backend, cancel=ctx.cancel,
                      on_token=lambda index, text: ctx.event({"type": "token", "text": text,
                                                             "tile": index}))
    detections = reply.answer.detections
    written, layer = None, ""
    if detections:
        path, layer = _output(request, f"ask-{uuid.uuid4().hex[:12]}")
        written = _write(detections, path, layer, reply.crs,
                         {"task": chat.task, "raster": chat.raster, **model_provenance(spec)})
    return {"text": reply.answer.text, "user_text": reply.user_text, "how": reply.how,
            "output": written, "layer": layer, "features": len(detections),
            "seconds": reply.seconds, "prompt_tokens": reply.prompt_tokens,
            "generated_tokens": reply.generated_tokens, "raw": reply.answer.raw,
            "counts": _counts(detections), "crs_wkt": _wkt(reply.crs),
            "problems": list(reply.answer.problems), "model": backend.describe()}
