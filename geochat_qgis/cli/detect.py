"""``detect``: raster -> tiles -> model -> detections -> Shapefile / GeoPackage / GeoJSON."""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..core.backends.base import CancelToken
from ..core.backends.openai_http import API_KEY_ENV
from ..core.errors import GeoChatError
from ..core.export import check_output
from ..core.georef import check_crs
from ..core.jobs import backend_spec as resolve, build_job, model_provenance
from ..core.outputs import write_result
from ..core.pipeline import run_job
from ..core.runtime.backend import open_backend
from .argtypes import fraction, non_negative_float, positive_float, positive_int
from .signals import cancel_on_signals

EPILOG = (
    "Exit status: 0 when every tile was processed or skipped for nodata; 1 when a tile failed, "
    "the run stopped on an error or nothing could be processed; 2 for bad arguments; 130 after "
    "Ctrl-C and 143 after SIGTERM. Whatever was finished is written: a complete run replaces "
    "the output, a partial one (cancelled, failed part way) writes NAME-partial-RUNID beside "
    "an existing output and keeps it; a run that processed no tile writes nothing over it."
)

TASKS = ("refer", "grounding", "segment")  # segment: GeoPixel referring masks


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --backend and the backend settings (shared with ``ask``)."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help="a GGUF file or folder (text model + mmproj), a Hugging Face "
                            "checkpoint folder, a catalog name, or with --backend openai the "
                            "server's model name")
    model.add_argument("--mmproj", help="the vision projector GGUF (default: the mmproj beside "
                                        "the model)")
    model.add_argument("--backend", choices=("llama.cpp", "transformers", "openai", "geopixel"),
                       help="default: from --model (or openai with --server-url)")
    model.add_argument("--family", choices=("geochat", "geopixel", "qwen2.5-vl"),
                       help="model family (default: from the model)")
    model.add_argument("--server-url", help="OpenAI-compatible server, e.g. "
                                            "http://127.0.0.1:8000/v1 (API key: $GEOCHAT_API_KEY)")
    model.add_argument("--max-in-flight", type=positive_int,
                       help="openai: requests at once (default 4)")
    model.add_argument("--timeout", type=positive_float,
                       help="openai: seconds per request (default 300)")
    model.add_argument("--threads", type=positive_int, help="llama.cpp: CPU threads (default: all)")
    model.add_argument("--n-ctx", type=positive_int, help="llama.cpp: context size (default 2048)")
    model.add_argument("--gpu-layers", type=int,
                       help="llama.cpp: layers on the GPU (default: all when there is one)")
    model.add_argument("--kv-f32", action="store_true",
                       help="llama.cpp: float32 KV cache (exact; twice the KV memory, a little "
                            "slower; default float16)")
    model.add_argument("--device", help="transformers, geopixel: cuda or cpu (default: cuda "
                                        "when present)")
    model.add_argument("--dtype", choices=("bfloat16", "float32"),
                       help="geopixel: weights and compute type (default bfloat16; float32 "
                            "takes twice the memory)")
    model.add_argument("--batch-size", type=positive_int,
                       help="transformers, geopixel: tiles per batch (default: several on "
                            "CUDA, 1 on CPU)")
    model.add_argument("--max-new-tokens", type=positive_int, default=256,
                       help="the longest answer, in tokens (default 256)")
    model.add_argument("--temperature", type=non_negative_float, default=0.0,
                       help="0 = greedy (default)")
    model.add_argument("--runtime", choices=("inprocess", "subprocess"), default="inprocess",
                       help="run the model here (default) or in a separate runtime process "
                            "that a native crash or out-of-memory kill cannot take down")


def add_area_arguments(parser: argparse.ArgumentParser) -> None:
    """RASTER and the area and tiling options (shared with ``ask``)."""
    parser.add_argument("raster", help="any raster GDAL reads")
    area = parser.add_argument_group("area")
    area.add_argument("--extent", type=_extent, help="XMIN,YMIN,XMAX,YMAX (default: all)")
    area.add_argument("--extent-crs", help="CRS of --extent (default: the raster's)")
    area.add_argument("--aoi", help="vector file: only tiles touching its polygons")
    area.add_argument("--tile-size", type=positive_int,
                      help="tile side in pixels (default: the model's)")
    area.add_argument("--gsd", type=positive_float, help="target metres per pixel (default: native)")
    area.add_argument("--bands", type=_bands, help="e.g. 4,3,2 (default: RGB)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_area_arguments(parser)
    parser.add_argument("--overlap", type=non_negative_float, default=0.1,
                        help="tile overlap: fraction (< 1) or pixels (default 0.1)")
    add_model_arguments(parser)
    task = parser.add_argument_group("task")
    task.add_argument("--task", choices=TASKS, default="refer")
    task.add_argument("--prompt", action="append", default=[],
                      help="what to find (repeat for several); grounding: the question")
    task.add_argument("--grammar", action="store_true",
                      help="constrain answers to GeoChat's box syntax (llama.cpp backends)")
    task.add_argument("--iou", type=fraction, default=0.5,
                      help="merge threshold across tiles (0-1, default 0.5)")
    task.add_argument("--angle", choices=("none", "ccw", "cw"), default="none",
                      help="how to read GeoChat's angle (unverified; default: keep the "
                           "axis-aligned box, angle as an attribute)")
    parser.add_argument("-o", "--output", required=True, help="OUT.shp, OUT.gpkg or OUT.geojson")
    parser.add_argument("--output-crs", help="CRS of the output (default: the raster's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _extent(text: str) -> tuple[float, float, float, float]:
    import math

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"give four finite numbers XMIN,YMIN,XMAX,YMAX, "
                                         f"not {text!r}")
    return values  # type: ignore[return-value]


def _bands(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("give band numbers like 1,2,3") from None


def job_request(args: argparse.Namespace) -> dict:
    """The arguments as a runtime request: core/jobs.py resolves it, as for the plugin (API key
    from $GEOCHAT_API_KEY)."""
    model = {
        "name": args.model, "backend": args.backend, "mmproj_path": args.mmproj,
        "server_url": args.server_url, "max_in_flight": args.max_in_flight,
        "timeout": args.timeout, "n_threads": args.threads, "n_ctx": args.n_ctx,
        "n_gpu_layers": args.gpu_layers, "device": args.device, "batch_size": args.batch_size,
        "dtype": getattr(args, "dtype", None), "kv_f32": getattr(args, "kv_f32", False) or None,
    }
    if args.server_url or args.backend == "openai":
        model["api_key"] = os.environ.get(API_KEY_ENV)
    prompts = args.prompt if isinstance(args.prompt, list) else [args.prompt]
    return {
        "raster": args.raster, "task": args.task, "prompts": prompts, "family": args.family,
        "classes": getattr(args, "classes", None) or [], "extent": args.extent,
        "extent_crs": args.extent_crs, "aoi_path": args.aoi, "model": model,
        "tiling": {"tile_size": args.tile_size, "gsd": args.gsd, "bands": args.bands,
                   "overlap": getattr(args, "overlap", 0.0)},
        "output": {"crs": getattr(args, "output_crs", None)},
        "options": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                    "grammar": getattr(args, "grammar", False),
                    "iou_threshold": getattr(args, "iou", 0.5),
                    "angle_convention": getattr(args, "angle", None)},
    }


def backend_spec(args: argparse.Namespace):
    """The BackendSpec the arguments describe (API key from $GEOCHAT_API_KEY)."""
    return resolve(job_request(args))


class ProgressBar:
    """One self-rewriting line on a terminal; silent elsewhere."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, progress) -> None:
        if not self.enabled or not progress.total:
            return
        width = 30
        filled = int(width * progress.done / progress.total)
        rate = progress.done / max(1e-9, time.perf_counter() - self.start) * 60
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {progress.done}/"
                         f"{progress.total} tiles, {progress.detections} detections, "
                         f"{rate:.1f} tiles/min")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse an output, extent CRS or output CRS that cannot work before any tile runs."""
    check_output(args.output)
    for name, what in (("extent_crs", "extent CRS (--extent-crs)"),
                       ("output_crs", "output CRS (--output-crs)")):
        if getattr(args, name, None):
            check_crs(getattr(args, name), what)


def run(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise GeoChatError("Say what to find with --prompt TEXT (repeat it for several things).")
    check_arguments(args)
    job = build_job(job_request(args))
    spec = job.backend
    cancel = CancelToken()
    bar = ProgressBar(not args.quiet)
    with cancel_on_signals(cancel) as interrupts:
        backend = open_backend(spec, args.runtime)
        try:
            result = run_job(job, backend, on_progress=bar, cancel=cancel)
        finally:
            bar.close()
            backend.close()
        with interrupts.shield():  # a signal now waits until the file is in place
            written = write_result(result, args.output,
                                   provenance={"task": job.task, "raster": args.raster,
                                               **model_provenance(spec)})
    report(result, written)
    return interrupts.exit_status or exit_status(result)


def report(result, written) -> None:
    """The summary line on stdout; failures, dropped boxes and notes on stderr."""
    failed = len({f.tile_id for f in result.failures})
    print(f"tiles: {result.tiles_done} done, {result.tiles_skipped} skipped (nodata), "
          f"{failed} failed of {result.tiles_planned}; detections: {len(result.detections)}; "
          f"tokens generated: {result.generated_tokens}; seconds: {result.seconds:.1f}; "
          f"output: {written.path or 'none'}")
    for failure in result.failures[:5]:
        print(f"  tile {failure.tile_id}: {failure.message}", file=sys.stderr)
    if len(result.failures) > 5:
        print(f"  ... and {len(result.failures) - 5} more failures", file=sys.stderr)
    if result.dropped:
        print(f"note: {len(result.dropped)} box(es) left out: {result.dropped[0]}",
              file=sys.stderr)
    unread = [a for a in result.answers if set(a.problems) - set(result.dropped)]
    if unread:
        first = next(p for p in unread[0].problems if p not in result.dropped)
        print(f"note: {len(unread)} of {len(result.answers)} answer(s) had parts that could not "
              f"be read (the log above names each; the first, tile {unread[0].tile_id}: "
              f"{first})", file=sys.stderr)
    if result.cancelled:
        print("cancelled", file=sys.stderr)
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    elif not result.tiles_done and result.failures:
        print("error: no tile could be processed", file=sys.stderr)
    if written.note:
        print(f"note: {written.note}", file=sys.stderr)


def exit_status(result) -> int:
    """The rule of EPILOG: 0 only when no tile failed and the run was complete."""
    if result.cancelled:
        return 130
    return 1 if result.error or result.failures else 0
