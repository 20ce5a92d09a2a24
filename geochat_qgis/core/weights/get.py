"""Get a catalog model ready to run: download it (and what its conversion needs), convert it.

``get_model("geochat-7b", "gguf", "q4_k_m")`` checks the plan first (disk for downloads +
output + temporary files, memory for the conversion; nothing is fetched when it does not fit),
downloads MBZUAI/geochat-7B and CLIP-336 (resuming partial files, linking files the Hugging Face
cache already holds), converts into a staging folder beside the target and renames it into
place with ``provenance.json`` in it: a half-written model never counts as installed, a
cancelled or failed conversion leaves no folder and no temporary file, and the next call starts
the conversion afresh. Models used as downloaded (the Qwen2.5-VL GGUFs) only download; GeoPixel's
pickle shards are written once as safetensors without the adapters it never runs.

``on_progress(phase, done, total, rate, eta)``: phase ``download`` (bytes), ``convert``
(tensors), ``quantize`` (steps), ``verify`` (bytes hashed); ``rate`` per second and ``eta`` in
seconds (None until known).
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ...__about__ import version
from ..cancel import CancelToken
from ..errors import Cancelled, GeoChatError, ModelError
from .catalog import Catalog, ModelEntry, PathLike, load_catalog
from .convert_hf import convert_geochat_to_hf
from .download import sha256_of
from .get_plan import GetPlan, converted_dir, is_installed, resolve_get
from .gguf_writer import MMPROJ_GGUF, TEXT_GGUF, _UNQUANTISED, convert_geochat_to_gguf
from .installed import (  # noqa: F401  (the public API of getting models, in one place)
    InstalledModel, SourceCleanup, delete_sources, installed_model, remove_converted,
    source_cleanup,
)
from .locks import exclusive
from .output_dir import staged_output_dir
from .provenance import PROVENANCE_FILE, combined_hash, write_provenance
from .quantize import quantize_gguf
from .store import _read_manifest, fetch_files, manifest_commit

OnProgress = Callable[[str, int, Optional[int], Optional[float], Optional[float]], None]
WEIGHT_SUFFIXES = (".gguf", ".safetensors")


class GetRefused(ModelError):
    """The plan does not fit this machine (disk, memory, offline); nothing was started."""

    def __init__(self, plan: GetPlan) -> None:
        super().__init__(" ".join(plan.problems))
        self.plan = plan


class _Meter:
    """Turns (done, total) into on_progress calls with a rate and time left."""

    def __init__(self, on_progress: Optional[OnProgress], phase: str,
                 cancel: Optional["CancelToken"]) -> None:
        self.on_progress, self.phase, self.cancel = on_progress, phase, cancel
        self.start = time.monotonic()
        self.first: Optional[int] = None
        self.last = 0.0

    def __call__(self, done: int, total: Optional[int], *_: Any) -> None:
        if self.cancel is not None and self.cancel.cancelled:
            raise Cancelled(f"Cancelled during {self.phase}; nothing half-written is kept "
                            "(downloads resume next time).")
        if self.on_progress is None:
            return
        now = time.monotonic()
        if self.first is None:
            self.first = done  # resumed bytes do not count towards the rate
        if now - self.last < 0.1 and done != total:
            return
        self.last = now
        elapsed = now - self.start
        rate = (done - self.first) / elapsed if elapsed > 0.2 and done > self.first else None
        eta = (total - done) / rate if rate and total is not None else None
        self.on_progress(self.phase, done, total, rate, eta)


def _files_of(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.name != PROVENANCE_FILE}


def _hash_outputs(folder: Path, meter: _Meter) -> dict[str, dict]:
    files = _files_of(folder)
    total = sum(p.stat().st_size for p in files.values())
    done, outputs = 0, {}
    meter(0, total)
    for name, path in files.items():
        outputs[name] = {"size": path.stat().st_size, "sha256": sha256_of(path, meter.cancel)}
        done += outputs[name]["size"]
        meter(done, total)
    return outputs


def _source_record(entry: ModelEntry, folder: Path) -> dict[str, Any]:
    files = _read_manifest(folder)
    return {"name": entry.name, "repo": entry.repo, "revision": entry.revision,
            "commit": manifest_commit(folder),
            "files": {name: info.get("sha256") for name, info in sorted(files.items())}}


@contextmanager
def _disk_errors(folder: Path) -> Iterator[None]:
    """A failed write in words: the disk filled up (another program, a wrong estimate) or the
    folder is not writable. Partial downloads are kept; a conversion leaves nothing."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, GeoChatError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT,
                                                              errno.EACCES, errno.EROFS):
            raise
        what = ("the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                else "the folder is not writable")
        raise ModelError(
            f"Getting the model stopped: {what} ({exc.filename or folder}). Partial downloads "
            "are kept and resume; nothing half-converted is left. Free some space (or choose "
            "another cache folder: GEOCHAT_CACHE or the plugin settings) and get it again."
        ) from exc


def _clean_stale(out: Path) -> None:
    """Remove what an interrupted earlier conversion of ``out`` left (a killed process)."""
    if out.exists() and not is_installed(out):
        shutil.rmtree(out, ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def _convert(entry: ModelEntry, target: str, quant: Optional[str], src: Path, clip: Optional[Path],
             work: Path, on_progress: Optional[OnProgress], cancel: Optional["CancelToken"]) -> dict:
    """Run the converter into ``work``; returns what provenance records about it."""
    meter = _Meter(on_progress, "convert", cancel)
    if target == "safetensors":  # GeoPixel: the shards once as safetensors, no dead adapters
        from ..models.geopixel.weights import convert_to_safetensors

        convert_to_safetensors(src, work, progress=meter, cancel=cancel)
        return {"name": "geochat-qgis/geopixel-weights", "version": version()}
    if target == "hf":
        convert_geochat_to_hf(src, work, clip=clip, progress=meter)
        return {"name": "geochat-qgis/convert_hf", "version": version()}
    import gguf

    dtype = "float16" if quant == "f16" else None
    convert_geochat_to_gguf(src, work, clip=clip, dtype=dtype, progress=meter)
    info = {"name": "geochat-qgis/gguf_writer", "version": version(),
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf")}
    if quant != "f16":
        step = _Meter(on_progress, "quantize", cancel)
        step(0, 1)
        os.replace(work / TEXT_GGUF, work / _UNQUANTISED)
        quantize_gguf(work / _UNQUANTISED, work / TEXT_GGUF, quant)
        (work / _UNQUANTISED).unlink()
        step(1, 1)
        info["llama_cpp"] = _dist_version("llama-cpp-python")
    assert (work / MMPROJ_GGUF).is_file()
    return info


def _dist_version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(name)
    except PackageNotFoundError:
        return None


def get_model(model_id: str, target: Optional[str] = None, quant: Optional[str] = None,
              cache: Optional[PathLike] = None, on_progress: Optional[OnProgress] = None,
              cancel: Optional["CancelToken"] = None, *, catalog: Optional[Catalog] = None,
              endpoint: Optional[str] = None, hf_cache: Optional[PathLike] = None,
              ignore_memory: bool = False, retries: int = 3) -> InstalledModel:
    """Download and convert ``model_id`` as ``target`` (gguf | hf) with ``quant`` (gguf:
    q4_k_m | q8_0 | f16); returns the ready model (at once when it is already there).

    Raises GetRefused (with ``.plan``) before any download when the disk or memory do not
    suffice, DownloadError (offline, missing file, refused), ModelError (a broken checkpoint),
    Cancelled (downloads are kept and resume; the conversion leaves nothing).
    """
    catalog = catalog or load_catalog()
    found = installed_model(model_id, target, quant, cache, catalog)
    if found is not None:  # no hub needed, even once the originals are deleted
        return found
    plan, sources = resolve_get(model_id, target, quant, cache, catalog=catalog,
                                endpoint=endpoint, hf_cache=hf_cache, ignore_memory=ignore_memory)
    chosen = next(c for c in plan.choices if (c.target, c.quant) == (plan.target, plan.quant))
    if plan.problems:
        raise GetRefused(plan)
    entry = catalog.get(model_id)
    out = converted_dir(entry, plan.target, plan.quant, cache)
    variant_lock = exclusive(out) if entry.convert else nullcontext()
    with variant_lock, _disk_errors(out.parent):
        total = sum(s.total_bytes for s in plan.sources)
        offset = 0
        meter = _Meter(on_progress, "download", cancel)
        for (source, remote), summary in zip(sources, plan.sources):
            if source.is_local:
                offset += summary.total_bytes
                continue

            def progress(done: int, _total: Optional[int], base: int = offset) -> None:
                meter(base + done, total)

            with exclusive(source.local_dir(cache)):  # shared by every variant's get
                fetch_files(source, remote.files, remote.commit, cache, endpoint, progress,
                            cancel, retries, hf_cache)
            offset += summary.total_bytes
        if plan.target == "download":
            found = installed_model(model_id, plan.target, None, cache, catalog, chosen.backends)
            if found is None:
                raise ModelError(f"{model_id}: the download finished but files are missing in "
                                 f"{entry.local_dir(cache)}; run `models verify {model_id}`.")
            return found
        _clean_stale(out)
        src = entry.local_dir(cache)
        clip = sources[1][0].local_dir(cache) if len(sources) > 1 else None
        with staged_output_dir(out) as stage:
            work = stage / "converted"
            converter = _convert(entry, plan.target, plan.quant, src, clip, work, on_progress, cancel)
            for item in work.iterdir():
                os.replace(item, stage / item.name)
            work.rmdir()
            outputs = _hash_outputs(stage, _Meter(on_progress, "verify", cancel))
            weights = {n: o["sha256"] for n, o in outputs.items() if n.endswith(WEIGHT_SUFFIXES)}
            write_provenance(stage, {
                "schema": 1, "model_id": entry.name, "target": plan.target, "quant": plan.quant,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": [_source_record(e, e.local_dir(cache)) for e, _ in sources],
                "converter": converter, "outputs": outputs, "model_hash": combined_hash(weights),
            })
    found = installed_model(model_id, plan.target, plan.quant, cache, catalog, chosen.backends)
    assert found is not None
    return found
