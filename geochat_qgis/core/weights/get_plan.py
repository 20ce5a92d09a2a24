"""What getting a model takes, stated before anything starts: downloads, sizes, disk, memory.

``plan_get`` lists the repositories to fetch (what is already in the model cache, what the
Hugging Face cache provides, what partial files resume, what is left to download), the size of
every output choice (GGUF q4_k_m / q8_0 / f16 for llama.cpp, the HF checkpoint for transformers
and vLLM), the disk needed (downloads + output + temporary files) against the disk free, and the
memory the conversion needs (about the largest shard + 1 GB for GeoChat, read with numpy; + 2 GB
for GeoPixel, converted with torch) against the memory available. Its
``problems`` are the reasons ``get_model`` would refuse to start. Output sizes are estimated
from the checkpoint's and CLIP's ``config.json`` (parameter counts), read from the cache or, a
few kilobytes into memory, from the hub.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from ..deps.requirements import CONVERTER_BACKENDS
from ..errors import ModelError
from .catalog import Catalog, ModelEntry, ModelFile, PathLike, cache_root, load_catalog
from .download import (PART_SUFFIX, SPACE_MARGIN_BYTES, DownloadError, fetch_json, file_url,
                       offline)
from .hub import RemoteFiles, hf_cache_file, remote_files
from .machine import _importable, backends_here, disk_free, memory_available, runnable_backends
from .provenance import PROVENANCE_FILE
from .sizes import (dtype_bytes, geopixel_output_bytes, output_sizes, rough_weight_counts,
                    weight_counts)
from .store import _read_manifest, is_complete, manifest_commit

TARGETS = ("gguf", "hf", "safetensors")  # safetensors: GeoPixel's own converted checkpoint
QUANTS = ("q4_k_m", "q8_0", "f16")
# beyond the largest shard, mapped in memory while it is converted (bench/convert_memory.py:
# GeoChat's numpy conversion peaks at the largest shard + 0.1 GiB)
CONVERSION_MEMORY_EXTRA = 1 << 30
TORCH_CONVERSION_MEMORY_EXTRA = 2 << 30  # GeoPixel's conversion runs torch
RUNTIME_MEMORY_EXTRA = 1 << 30  # beyond the weights, to run a model (context, image features)


@dataclass(frozen=True)
class SourcePlan:
    """One repository to fetch and how much of it is already here."""

    name: str
    repo: str
    revision: str
    commit: Optional[str]
    folder: str
    files: int
    total_bytes: int
    present_bytes: int  # complete in the model cache
    hf_cache_bytes: int  # linked from the Hugging Face cache, not downloaded
    partial_bytes: int  # partial files a download resumes
    fetch_bytes: int  # still to download
    largest_file: int


@dataclass(frozen=True)
class OutputChoice:
    """One output the model can be got as, with its size and what runs it here."""

    target: str  # gguf | hf | download (a model used as downloaded)
    quant: Optional[str]
    bytes: int
    temp_bytes: int
    backends: tuple[str, ...]  # backends that load it and run on this machine
    not_here: dict[str, str]  # other backends that load it -> why not here
    installed: Optional[str]  # its folder when already got


@dataclass(frozen=True)
class GetPlan:
    model_id: str
    target: str
    quant: Optional[str]
    sources: tuple[SourcePlan, ...]
    choices: tuple[OutputChoice, ...]
    output_bytes: int
    temp_bytes: int
    download_bytes: int
    disk_needed: int
    disk_free: int
    disk_folder: str
    memory_needed: int
    memory_available: Optional[int]
    output_folder: str
    installed: Optional[str]
    offline: bool
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    conversion_missing: tuple[str, ...] = ()  # packages the conversion needs, not installed

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (for the runtime protocol and ``models get --plan --json``)."""
        data = asdict(self)
        data["ok"] = self.ok
        return data


def converted_dir(entry: ModelEntry, target: str, quant: Optional[str],
                  cache: Optional[PathLike] = None) -> Path:
    """The folder a converted model lives in: ``<cache>/converted/<name>/<target>[-<quant>]``."""
    variant = f"{target}-{quant}" if target == "gguf" else target
    return cache_root(cache) / "converted" / entry.name / variant


def is_installed(folder: Path) -> bool:
    """A converted model counts only once complete: its folder holds its provenance record."""
    return (Path(folder) / PROVENANCE_FILE).is_file()


def conversion_needs(target: str, quant: Optional[str]) -> list[str]:
    """Python packages the conversion needs that this environment lacks (checked before any
    download: a 16 GB download that cannot be converted helps nobody). GeoChat's conversions
    need no torch: GGUF takes gguf and sentencepiece (and llama.cpp to quantise), the HF
    checkpoint transformers for its tokenizer and processor files."""
    import importlib

    importlib.invalidate_caches()  # packages installed since this process started count
    needed = {"numpy": "numpy", "sentencepiece": "sentencepiece"}
    if target == "gguf":
        needed["gguf"] = "gguf"
        if quant != "f16":
            needed["llama_cpp"] = "llama-cpp-python (to quantise)"
    elif target == "hf":
        needed["transformers"] = "transformers"
    else:  # GeoPixel's own conversion runs torch
        needed.update({"torch": "torch", "safetensors": "safetensors"})
    return [label for module, label in needed.items() if not _importable(module)]


def check_choice(entry: ModelEntry, target: Optional[str], quant: Optional[str]) -> tuple[str, Optional[str]]:
    """The (target, quant) to use for ``entry``; ModelError naming the valid choices."""
    if not entry.convert:
        native = "gguf" if entry.format == "gguf" else "hf"
        if target not in (None, "download", native) or quant:
            raise ModelError(f"Model '{entry.name}' is used as downloaded ({entry.format}); "
                             "it takes no --to or --quant.")
        return "download", None
    targets = tuple(entry.convert.get("to") or TARGETS)
    target = target or targets[-1]
    if target not in targets:
        raise ModelError(f"Model '{entry.name}' converts to {' or '.join(targets)}, not {target!r}.")
    if target != "gguf":
        if quant:
            raise ModelError(f"--quant applies to --to gguf only; the {target} checkpoint keeps "
                             "the model's float weights.")
        return target, None
    quant = (quant or "q4_k_m").lower()
    if quant not in QUANTS:
        raise ModelError(f"Unknown quantisation {quant!r} for GGUF: use one of {', '.join(QUANTS)}.")
    return target, quant


def _source(entry: ModelEntry, cache: Optional[PathLike], endpoint: Optional[str],
            hf_cache: Optional[PathLike], online: bool = True) -> tuple[SourcePlan, RemoteFiles]:
    folder = entry.local_dir(cache)
    if entry.is_local:  # the user's own folder: used as it is, never downloaded into
        missing = [f.path for f in entry.files if not (folder / f.path).is_file()]
        if missing:
            raise ModelError(f"Model '{entry.name}' points at {folder}, which lacks "
                             f"{', '.join(missing)}; copy them there or fix the user catalog.")
        total = sum((folder / f.path).stat().st_size for f in entry.files)
        return SourcePlan(entry.name, str(folder), entry.revision, None, str(folder),
                          len(entry.files), total, total, 0, 0, 0,
                          max(((folder / f.path).stat().st_size for f in entry.files), default=0)
                          ), RemoteFiles(None, entry.files)
    pinned = manifest_commit(folder)
    manifest = _read_manifest(folder)
    try:
        if offline() or not online:
            raise DownloadError("offline")
        remote = remote_files(entry, endpoint, pinned)
    except DownloadError as exc:
        local = RemoteFiles(pinned, entry.files)
        complete = bool(entry.files) and all(is_complete(folder, f, manifest) or
                                             hf_cache_file(entry.repo, f, [pinned, entry.revision], hf_cache)
                                             for f in entry.files)
        if not complete and str(exc) != "offline":
            raise
        remote = local
    present = hf = partial = 0
    for item in remote.files:
        if is_complete(folder, item, manifest):
            present += item.expected_bytes
        elif hf_cache_file(entry.repo, item, [remote.commit, entry.revision], hf_cache):
            hf += item.expected_bytes
        elif (folder / (item.path + PART_SUFFIX)).is_file():
            partial += (folder / (item.path + PART_SUFFIX)).stat().st_size
    total = sum(f.expected_bytes for f in remote.files)
    plan = SourcePlan(
        name=entry.name, repo=str(entry.repo), revision=entry.revision, commit=remote.commit,
        folder=str(folder), files=len(remote.files), total_bytes=total, present_bytes=present,
        hf_cache_bytes=hf, partial_bytes=partial, fetch_bytes=max(total - present - hf - partial, 0),
        largest_file=max((f.expected_bytes for f in remote.files), default=0),
    )
    return plan, remote


def _config(entry: ModelEntry, commit: Optional[str], cache: Optional[PathLike],
            endpoint: Any, hf_cache: Optional[PathLike]) -> Optional[dict]:
    """The repository's config.json: from the model cache, the HF cache, else the hub
    (``endpoint`` False: never the hub)."""
    import json

    local = entry.local_dir(cache) / "config.json"
    hit = hf_cache_file(str(entry.repo), ModelFile("config.json"), [commit, entry.revision], hf_cache)
    for path in (local, hit[0] if hit else None):
        if path is not None and path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass
    if offline() or entry.repo is None or endpoint is False:
        return None
    try:
        return fetch_json(file_url(entry.repo, commit or entry.revision, "config.json", endpoint))
    except DownloadError:
        return None


def plan_get(model_id: str, target: Optional[str] = None, quant: Optional[str] = None,
             cache: Optional[PathLike] = None, *, catalog: Optional[Catalog] = None,
             endpoint: Optional[str] = None, hf_cache: Optional[PathLike] = None,
             ignore_memory: bool = False, online: bool = True) -> GetPlan:
    """What ``get_model(model_id, target, quant, cache)`` will download, write and need.

    ``online`` False: ask no server (the catalog's approximate sizes; for a quick listing).
    Raises ModelError for a wrong choice, DownloadError when the hub lacks a file or cannot be
    reached while files are missing.
    """
    return resolve_get(model_id, target, quant, cache, catalog=catalog, endpoint=endpoint,
                       hf_cache=hf_cache, ignore_memory=ignore_memory, online=online)[0]


def resolve_get(model_id: str, target: Optional[str], quant: Optional[str],
                cache: Optional[PathLike], *, catalog: Optional[Catalog] = None,
                endpoint: Optional[str] = None, hf_cache: Optional[PathLike] = None,
                ignore_memory: bool = False, online: bool = True,
                ) -> tuple[GetPlan, list[tuple[ModelEntry, RemoteFiles]]]:
    """The plan, and each source entry with the exact files (and commit) to fetch."""
    catalog = catalog or load_catalog()
    entry = catalog.get(model_id)
    if entry.is_local:
        raise ModelError(f"Model '{entry.name}' is your own folder {entry.local_path}; there is "
                         "nothing to get.")
    target, quant = check_choice(entry, target, quant)
    needs = [catalog.get(name) for name in (entry.convert or {}).get("requires", [])]
    sources = [_source(e, cache, endpoint, hf_cache, online) for e in [entry, *needs]]
    notes: list[str] = []
    choices = _choices(entry, needs, sources, cache, endpoint if online else False, hf_cache, notes)
    chosen = next(c for c in choices if (c.target, c.quant) == (target, quant))
    download = sum(s.fetch_bytes for s, _ in sources)
    extra = TORCH_CONVERSION_MEMORY_EXTRA if entry.family == "geopixel" else CONVERSION_MEMORY_EXTRA
    memory_needed = (sources[0][0].largest_file + extra) if entry.convert else 0
    out_folder = (converted_dir(entry, target, quant, cache) if entry.convert
                  else entry.local_dir(cache))
    installed = chosen.installed
    needed = 0 if installed else download + chosen.bytes + chosen.temp_bytes
    folder = cache_root(cache)
    free = disk_free(folder)
    available = memory_available()
    problems = []
    if not installed and needed and free < needed + SPACE_MARGIN_BYTES:
        problems.append(
            f"Not enough free disk space in {folder}: {needed / 1e9:.2f} GB needed (downloads "
            f"{download / 1e9:.2f} GB + model {chosen.bytes / 1e9:.2f} GB + temporary "
            f"{chosen.temp_bytes / 1e9:.2f} GB), {free / 1e9:.2f} GB free. Free some space or "
            "choose another cache folder (GEOCHAT_CACHE or the plugin settings).")
    if not installed and entry.convert and available is not None and available < memory_needed:
        text = (f"The conversion needs about {memory_needed / 1e9:.1f} GB of memory (largest "
                f"shard + {extra >> 30} GB), {available / 1e9:.1f} GB is available. Close other programs")
        if ignore_memory:
            notes.append(text + "; going ahead as asked (it may swap).")
        else:
            problems.append(text + ", or go ahead anyway and let it swap (the Get dialog's "
                            "\"Go ahead with less memory\" box; --ignore-memory on the command "
                            "line).")
    missing = [] if installed else conversion_needs(target, quant) if entry.convert else []
    if missing:
        problems.append(f"Converting needs {', '.join(missing)}, not installed in this "
                        f"environment: install the {CONVERTER_BACKENDS.get(target, target)} backend's "
                        "packages first (Raster > GeoChat > Install model dependencies).")
    if offline() and download and not installed:
        problems.append(f"Offline mode (HF_HUB_OFFLINE=1): {download / 1e9:.2f} GB still to "
                        "download. Unset HF_HUB_OFFLINE, or copy the files into the model cache.")
    plan = GetPlan(
        model_id=entry.name, target=target, quant=quant, sources=tuple(s for s, _ in sources),
        choices=tuple(choices), output_bytes=chosen.bytes, temp_bytes=chosen.temp_bytes,
        download_bytes=download, disk_needed=needed, disk_free=free, disk_folder=str(folder),
        memory_needed=memory_needed, memory_available=available, output_folder=str(out_folder),
        installed=installed, offline=offline(), problems=tuple(problems), notes=tuple(notes),
        conversion_missing=tuple(missing),
    )
    return plan, [(e, remote) for e, (_, remote) in zip([entry, *needs], sources)]


def _choices(entry: ModelEntry, needs: list[ModelEntry], sources: list, cache: Optional[PathLike],
             endpoint: Any, hf_cache: Optional[PathLike], notes: list[str]) -> list[OutputChoice]:
    here = backends_here()
    if not entry.convert:
        fmt = "gguf" if entry.format == "gguf" else entry.format
        size = sources[0][0].total_bytes
        ok, why = runnable_backends(fmt, size + RUNTIME_MEMORY_EXTRA, here)
        folder = entry.local_dir(cache)
        files = sources[0][1].files
        done = bool(files) and all(is_complete(folder, f, _read_manifest(folder)) for f in files)
        return [OutputChoice("download", None, 0, 0, tuple(ok), why, str(folder) if done else None)]
    plan, remote = sources[0]
    config = _config(entry, remote.commit, cache, endpoint, hf_cache)
    if entry.family == "geopixel":  # one choice: the weights as safetensors, less dead adapters
        size = geopixel_output_bytes(config, plan.total_bytes)
        ok, why = runnable_backends("safetensors", size + RUNTIME_MEMORY_EXTRA, here)
        folder = converted_dir(entry, "safetensors", None, cache)
        return [OutputChoice("safetensors", None, size, 0, tuple(ok), why,
                             str(folder) if is_installed(folder) else None)]
    clip_entry = needs[0] if needs else None
    clip = (_config(clip_entry, sources[1][0].commit, cache, endpoint, hf_cache)
            if clip_entry else None)
    src_bytes = dtype_bytes(config)
    try:
        weights = weight_counts(config, clip) if config and clip else None
    except (KeyError, TypeError, ValueError):
        weights = None
    if weights is None:
        notes.append("Output sizes are rough: the checkpoint's config.json could not be read.")
        weights = rough_weight_counts(plan.total_bytes, src_bytes)
    choices = []
    for target in sorted(entry.convert.get("to") or TARGETS, key=TARGETS.index):
        for quant in (QUANTS if target == "gguf" else (None,)):
            size, temp = output_sizes(target, quant, weights, src_bytes)
            ok, why = runnable_backends(target, size + RUNTIME_MEMORY_EXTRA, here)
            folder = converted_dir(entry, target, quant, cache)
            choices.append(OutputChoice(target, quant, size, temp, tuple(ok), why,
                                        str(folder) if is_installed(folder) else None))
    return choices
