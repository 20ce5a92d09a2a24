"""One Job in, results out: tiles -> backend -> family parser -> georeference -> merge.

Front ends (CLI, Processing, the dock's task, the subprocess runtime) build a :class:`Job` and
call :func:`run_job`; none of them reaches into tiling or a backend itself. A cancelled or failed
run still returns everything finished so far, with the reason; a tile that fails is recorded and
the run goes on (until ``max_consecutive_failures`` batches in a row fail, e.g. a server down).
"""
from __future__ import annotations

import logging
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

from .backends.base import Backend, CancelToken, Conversation, GenerateOptions, TokenCallback
from .backends.factory import BackendSpec, create_backend
from .backends.grammar import box_grammar
from .errors import BackendError, Cancelled, GeoChatError, ParseError
from .families import get_family
from .georef import check_crs
from .merge import DEFAULT_IOU, merge_detections
from .results import Detection, georeference
from .tile_reading import iter_tiles, model_tile
from .tile_types import TileEvent, TileSpec
from .tiling import plan_tiles

log = logging.getLogger(__name__)

T = TypeVar("T")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_run_id(value: Any) -> str:
    """``value`` as a run id, which names the run's files (its checkpoint, its partial output):
    letters, digits, '_' and '-' only; GeoChatError otherwise."""
    text = str(value)
    if not _RUN_ID.match(text):
        raise GeoChatError(f"run id {text[:80]!r} is not letters, digits, '_' or '-' (at most 64; "
                           "it names the run's files): leave it out to get a new one")
    return text


@dataclass
class Job:
    """Everything a run needs, as plain data (the subprocess runtime sends it as JSON)."""

    raster: str
    task: str = "refer"
    prompts: Sequence[str] = ()  # one question / phrase per entry; each tile is asked each
    family: str = "geochat"
    extent: Optional[tuple[float, float, float, float]] = None
    extent_crs: Optional[str] = None  # None: the raster's CRS
    aoi: Any = None  # polygons or a vector file, as plan_tiles takes it
    tile_spec: Optional[TileSpec] = None  # None: the family's tile size, no overlap
    classes: Sequence[str] = ()  # scene classification
    backend: Optional[BackendSpec] = None  # used when run_job gets no backend
    output_crs: Optional[str] = None  # None: the raster's CRS
    max_new_tokens: int = 256
    temperature: float = 0.0
    grammar: bool = False  # constrain box answers with GBNF (llama.cpp, llama.cpp servers)
    iou_threshold: float = DEFAULT_IOU
    family_settings: dict[str, Any] = field(default_factory=dict)
    max_consecutive_failures: int = 3
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


@dataclass
class TileAnswer:
    """What the model said about one tile for one prompt."""

    tile_id: str
    prompt: str
    text: str
    raw: str
    problems: list[str]
    detections: int
    seconds: float
    prompt_tokens: int
    generated_tokens: int


@dataclass
class TileFailure:
    tile_id: str
    message: str
    prompt: str = ""


@dataclass
class Progress:
    """Reported after each batch: tiles finished (done + failed) out of the planned total."""

    done: int
    total: int
    tile_ids: list[str]
    detections: int
    # since the last report: georeferenced detections before merging, failed tiles (the
    # runtime streams them, and checkpoints the detections so a crash keeps finished tiles)
    found: list[Detection] = field(default_factory=list)
    failures: list[TileFailure] = field(default_factory=list)


@dataclass
class JobResult:
    run_id: str
    model: str
    crs: Optional[str]
    detections: list[Detection] = field(default_factory=list)  # merged, in ``crs``
    answers: list[TileAnswer] = field(default_factory=list)
    failures: list[TileFailure] = field(default_factory=list)
    tiles_planned: int = 0
    tiles_done: int = 0
    tiles_skipped: int = 0
    cancelled: bool = False  # by the cancel token, or an interrupt (Ctrl-C)
    error: Optional[str] = None  # why the run stopped early (results so far are kept)
    seconds: float = 0.0
    dropped: list[str] = field(default_factory=list)  # boxes left out (not in the output CRS)
    # an unexpected exception (a bug) that stopped the run; its traceback was logged
    fault: Optional[BaseException] = field(default=None, repr=False, compare=False)

    @property
    def complete(self) -> bool:
        return not self.cancelled and self.error is None

    @property
    def generated_tokens(self) -> int:
        return sum(answer.generated_tokens for answer in self.answers)


ProgressCallback = Callable[[Progress], None]


def default_tile_spec(job: Job, family) -> TileSpec:
    """The job's tile spec, or the family's square tile size and pad colour."""
    if job.tile_spec is not None:
        return job.tile_spec
    preprocess = family.preprocess
    spec = TileSpec(tile_size=preprocess.size or 504)
    return replace(spec, pad_rgb=preprocess.pad_rgb) if preprocess.pad_rgb else spec


def job_prompts(job: Job, family) -> list[tuple[str, str]]:
    """``[(what the user typed, the user-turn text for the model), ...]``."""
    typed = [p for p in job.prompts if p and p.strip()] or [""]
    return [(text, family.build_prompt(job.task, text, classes=job.classes)) for text in typed]


def run_job(job: Job, backend: Optional[Backend] = None,
            on_progress: Optional[ProgressCallback] = None,
            cancel: Optional[CancelToken] = None,
            on_token: Optional[TokenCallback] = None) -> JobResult:
    """Run ``job`` on ``backend`` (or one built from ``job.backend``) and merge the detections.

    Raises GeoChatError before any tile runs (bad raster, extent, model); after that, returns a
    JobResult whose ``cancelled`` / ``error`` say whether it stopped early. A backend given is
    left loaded for the next job; one built here is closed at the end.
    """
    if backend is not None:
        return _run(job, backend, on_progress, cancel, on_token)
    if job.backend is None:
        raise BackendError("The job names no backend and none was given.")
    with create_backend(job.backend) as owned:
        return _run(job, owned, on_progress, cancel, on_token)


def _run(job: Job, backend: Backend, on_progress: Optional[ProgressCallback],
         cancel: Optional[CancelToken], on_token: Optional[TokenCallback]) -> JobResult:
    start = time.perf_counter()
    family = get_family(job.family, **job.family_settings)
    prompts = job_prompts(job, family)
    spec = default_tile_spec(job, family)
    if job.output_crs is not None:  # a bad one fails now, not after every tile ran
        check_crs(job.output_crs, "output CRS")
    plan = plan_tiles(job.raster, spec, extent=job.extent, extent_crs=job.extent_crs, aoi=job.aoi)
    backend.load()
    options = GenerateOptions(
        max_new_tokens=job.max_new_tokens, temperature=job.temperature,
        stop=getattr(family, "stop", ()), on_token=on_token, cancel=cancel,
        grammar=box_grammar(family.name, job.task) if job.grammar else None,
    )
    result = JobResult(job.run_id, backend.describe(), job.output_crs or plan.crs,
                       tiles_planned=len(plan))

    def on_event(event: TileEvent) -> None:  # from the reading thread
        if event.kind == "failed":
            result.failures.append(TileFailure(event.tile.tile_id, event.message))

    found: list[Detection] = []
    attributes = {"task": job.task, "model": backend.describe(), "raster": str(job.raster),
                  "run_id": job.run_id}
    failed_in_a_row = finished = reported = sent_found = sent_failed = 0
    try:
        for batch in _batches(_prefetch(iter_tiles(plan, on_event), 2 * backend.batch_size),
                              backend.batch_size):
            if cancel is not None:
                cancel.raise_if_cancelled()
            ok = _run_batch(batch, prompts, backend, family, options, attributes, job, result,
                            found)
            failed_in_a_row = 0 if ok else failed_in_a_row + 1
            if on_progress is not None:
                finished += len(batch)
                counts = plan.counts  # tiles the reader skipped (nodata) or could not read
                reported = min(len(plan), finished + counts.skipped_nodata + counts.failed)
                failed_now = len(result.failures)  # the reading thread may append meanwhile
                on_progress(Progress(reported, len(plan), [t.tile_id for t in batch], len(found),
                                     found[sent_found:], result.failures[sent_failed:failed_now]))
                sent_found, sent_failed = len(found), failed_now
            if failed_in_a_row >= job.max_consecutive_failures:
                result.error = result.failures[-1].message
                break
    except (Cancelled, KeyboardInterrupt):  # KeyboardInterrupt: a second Ctrl-C
        result.cancelled = True
    except GeoChatError as exc:  # a fatal error mid-run: keep what is done
        result.error = str(exc)
    except Exception as exc:  # a bug: said as one, logged with its traceback, results kept
        log.error("internal error after %d tiles", result.tiles_done, exc_info=True)
        result.error = (f"internal error ({type(exc).__name__}: {str(exc)[:200]}): this is a "
                        f"bug, please report it; the finished tiles are kept")
        result.fault = exc
    if on_progress is not None and result.complete and reported < len(plan):
        on_progress(Progress(len(plan), len(plan), [], len(found), [],  # trailing skipped tiles
                             result.failures[sent_failed:]))
    result.tiles_skipped = plan.counts.skipped_nodata
    result.detections = merge_detections(found, job.iou_threshold) if found else []
    result.seconds = time.perf_counter() - start
    return result


def _run_batch(batch, prompts, backend: Backend, family, options: GenerateOptions,
               attributes: dict[str, Any], job: Job, result: JobResult,
               found: list[Detection]) -> bool:
    """Ask every prompt about the tiles of ``batch``; False when the backend failed for all.

    A tile is done once one of its answers was parsed (an unparsable answer is a failure)."""
    any_ok = False
    answered: set[str] = set()
    batch = [model_tile(tile, family.preprocess.crop_padding) for tile in batch]
    for typed, user_text in prompts:
        conversation = Conversation.single(user_text, family.name)
        pairs = _generate_each(batch, backend, conversation, options, typed, result)
        any_ok = any_ok or bool(pairs)
        for tile, generation in pairs:
            size = (tile.image.shape[1], tile.image.shape[0])
            answer = _parse(family, generation.text, size, generation.masks,
                            typed or job.task, tile.tile_id, typed, result)
            if answer is None:
                continue
            answered.add(tile.tile_id)
            for detection in answer.detections:
                detection.attributes.update(attributes, prompt=typed or user_text)
            dropped: list[str] = []
            placed = georeference(answer.detections, tile, job.output_crs, dropped)
            if answer.problems:  # the rest of the answer counts; detect says how many had these
                log.warning("tile %s, prompt %r: %s", tile.tile_id, typed or job.task,
                            "; ".join(answer.problems))
            answer.problems += dropped
            result.dropped += dropped
            found.extend(placed)
            result.answers.append(TileAnswer(
                tile.tile_id, typed, answer.text, generation.text, answer.problems, len(placed),
                generation.seconds, generation.prompt_tokens, generation.generated_tokens))
    result.tiles_done += len(answered)
    return any_ok


def _generate_each(batch, backend: Backend, conversation: Conversation,
                   options: GenerateOptions, typed: str, result: JobResult) -> list[tuple]:
    """(tile, generation) for the tiles of ``batch`` the backend answered. A batch the backend
    failed is asked again tile by tile, so one bad request (a server's HTTP 500 for one image,
    a cut stream) costs its own tile only, not the answered tiles beside it."""
    try:
        return list(zip(batch, backend.generate([t.image for t in batch], conversation, options)))
    except BackendError as exc:
        if len(batch) == 1:
            log.warning("tile %s failed: %s", batch[0].tile_id, exc)
            result.failures.append(TileFailure(batch[0].tile_id, str(exc), typed))
            return []
    pairs: list[tuple] = []
    for tile in batch:
        pairs += _generate_each([tile], backend, conversation, options, typed, result)
    return pairs


def _parse(family, text: str, size: tuple[int, int], masks, label: str, tile_id: str,
           typed: str, result: JobResult):
    """The family's Answer, or None with the tile's failure recorded: one bad answer costs
    one tile. A parser that raises anything but ParseError has a bug: its traceback is logged
    and the failure says so."""
    try:
        return family.parse(text, size, masks, default_label=label)
    except ParseError as exc:
        result.failures.append(TileFailure(tile_id, str(exc), typed))
    except Exception as exc:  # a parser bug must not end the run: logged, said, one tile lost
        log.error("the %s parser failed on tile %s", family.name, tile_id, exc_info=True)
        result.failures.append(TileFailure(
            tile_id, f"the {family.name} parser failed on this answer ({type(exc).__name__}: "
                     f"{str(exc)[:200]}): a bug, please report it with the answer", typed))
    return None


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


_END = object()


def _prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items`` read ahead by a background thread (tile reads overlap model time)."""
    buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                buffer.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            buffer.put(exc)
        buffer.put(_END)

    thread = threading.Thread(target=produce, name="geochat-tiles", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(0.05)
