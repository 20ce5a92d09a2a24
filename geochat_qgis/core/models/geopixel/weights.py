"""Load GeoPixel's published weights into the three parts, never touching the dead adapters.

The published checkpoint is three pickle shards (``pytorch_model-0000k-of-00003.bin``, opened
only with ``torch.load(weights_only=True, mmap=True)``: memory-mapped, so a tensor is read when
it is copied, not before) with ``pytorch_model.bin.index.json``; :func:`convert_to_safetensors`
writes it once as ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, which
the loader prefers when present. Every checkpoint name goes through one table (:func:`route`):
a part (text, vision, sam2) or skipped, never read:

- the dead adapters ``*.lora_sft_*``, ``*.lora_dpo_*``, ``*.lora_web_*`` (about 2 B parameters
  at 7B; GeoPixel's ``infer_mode='base'`` never runs them);
- SAM-2's video parts (:func:`sam2_unused.is_unused`);
- non-persistent buffers some savers still write (``position_ids``, ``rotary_emb.inv_freq``).

A name no row knows, and a tensor a part lacks or finds mis-shaped, is a ModelError naming it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import torch

from ...errors import ModelError
from ...weights.checkpoint_io import checkpoint_metadata, open_shard, shard_metadata
from ...weights.safetensors_stream import SafetensorsStreamWriter
from ...weights.shard_index import index_shards
from . import decoder, sam2, vision
from .config import DTYPES, GeoPixelConfig, read_config_json
from .sam2_unused import is_unused
from .tokenizer import TOKENIZER_FILES

BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEAD_ADAPTERS = (".lora_sft_", ".lora_dpo_", ".lora_web_")
IGNORED_BUFFERS = ("embeddings.position_ids", "rotary_emb.inv_freq")
PARTS = ("text", "vision", "sam2")
# checkpoint-name prefix -> part (first match wins; skipped names are decided before)
ROUTES = (
    ("model.visual_model.", "sam2"), ("model.text_hidden_fcs.", "sam2"),
    ("model.tok_embeddings.", "text"), ("model.layers.", "text"), ("model.norm.", "text"), ("output.", "text"),
    ("vit.", "vision"), ("vision_proj.", "vision"), ("plora_glb_GN", "vision"), ("plora_sub_GN", "vision"),
)
_AGAIN = "download the model again (or finish its conversion)"
LOADERS = {"text": decoder.load_state, "vision": vision.load_state, "sam2": sam2.load_state}


def is_skipped(name: str) -> bool:
    """True for a checkpoint tensor GeoPixel stores but never uses (never read by the loader)."""
    return any(d in name for d in DEAD_ADAPTERS) or is_unused(name) or name.endswith(IGNORED_BUFFERS)


def route(name: str) -> Optional[str]:
    """The part a checkpoint tensor belongs to; None when it is skipped. Unknown -> ModelError."""
    if is_skipped(name):
        return None
    for prefix, part in ROUTES:
        if name.startswith(prefix):
            return part
    raise ModelError(f"Checkpoint tensor {name!r} belongs to no part of GeoPixel (language model, CLIP "
                     "tower, SAM-2): the checkpoint is not GeoPixel's layout. Use MBZUAI/GeoPixel-7B or "
                     "GeoPixel-7B-RES as published.")


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight shards to read: the converted safetensors when complete, else the published .bin.
    An index's shard names are checked to be safe paths inside ``folder`` (shard_index.py)."""
    folder = Path(folder)
    if (folder / SAFETENSORS_INDEX).is_file():
        return index_shards(folder, folder / SAFETENSORS_INDEX, _AGAIN)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / BIN_INDEX).is_file():
        return index_shards(folder, folder / BIN_INDEX, _AGAIN)
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise ModelError(f"No GeoPixel weights in {folder}: expected {BIN_INDEX} with its .bin shards (as "
                     f"MBZUAI/GeoPixel-7B publishes them) or {SAFETENSORS_INDEX} (converted).")


def checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Full name -> shape of every tensor in ``files`` (headers / pickles only: no tensor data)."""
    return {name: meta.shape for name, meta in checkpoint_metadata(files).items()}


@dataclass
class LoadReport:
    """What a load read: every tensor name copied into a part, and the bytes read from disk."""

    read: list[str] = field(default_factory=list)
    bytes_read: int = 0
    skipped: int = 0


class _PartTensors(Mapping):
    """One part's tensors, read (and moved to ``device`` / cast to ``dtype``) when accessed."""

    def __init__(self, where: dict[str, Mapping[str, torch.Tensor]], device: torch.device,
                 dtype: torch.dtype, report: LoadReport, on_read: Optional[Callable[[str], None]]) -> None:
        self._where, self._device, self._dtype = where, device, dtype
        self._report, self._on_read = report, on_read

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._where[name][name]
        self._report.read.append(name)
        self._report.bytes_read += tensor.numel() * tensor.element_size()
        if self._on_read is not None:
            self._on_read(name)
        if tensor.is_floating_point():
            return tensor.to(device=self._device, dtype=self._dtype)
        return tensor.to(device=self._device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_parts(files: list[Path], parts: Mapping[str, torch.nn.Module], *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.bfloat16, on_read: Optional[Callable[[str], None]] = None,
               cancel=None) -> LoadReport:
    """Copy every used tensor of ``files`` into ``parts`` ({"text": decoder, "vision": ..., "sam2": ...},
    built on ``meta`` or allocated); skipped tensors are never read. Returns what was read."""
    report = LoadReport()
    device = torch.device(device)
    with ExitStack() as stack:
        routed: dict[str, dict[str, Mapping[str, torch.Tensor]]] = {part: {} for part in PARTS}
        for path in files:
            shard = stack.enter_context(open_shard(path))
            for name in shard:
                part = route(name)
                if part is None:
                    report.skipped += 1
                else:
                    routed[part][name] = shard
        for part in PARTS:
            if cancel is not None:
                cancel.raise_if_cancelled()
            LOADERS[part](parts[part], _PartTensors(routed[part], device, dtype, report, on_read))
    return report


# --- conversion: the published .bin shards -> safetensors, once, without the skipped tensors ---

COPIED_FILES = ("config.json", "generation_config.json") + TOKENIZER_FILES
Progress = Callable[[int, int], None]


def _safetensors_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def _plan(files: list[Path]) -> list[tuple[Path, str, list[tuple[str, tuple[int, ...], str]]]]:
    """(source shard, output name, [(name, shape, stored dtype)]) per shard, skipped names left out."""
    metas = checkpoint_metadata(files)
    plan = []
    for number, path in enumerate(files, start=1):
        kept = [(name, meta.shape, meta.dtype) for name, meta in metas.items()
                if meta.shard == path and route(name) is not None]
        plan.append((path, _safetensors_name(number, len(files)), kept))
    return plan


def _done(path: Path, entries: list[tuple[str, tuple[int, ...], str]]) -> bool:
    """Whether ``path`` is a complete shard holding exactly ``entries`` (resume skips it)."""
    if not path.is_file():
        return False
    try:
        metas = shard_metadata(path)
    except ModelError:
        return False
    return {name: (meta.shape, meta.dtype) for name, meta in metas.items()} == \
        {name: (shape, dtype) for name, shape, dtype in entries}


def _write_shard(source: Path, target: Path, entries: list[tuple[str, tuple[int, ...], str]],
                 progress: Callable[[int], None], cancel) -> None:
    """One safetensors shard, written beside ``target`` and renamed into place when complete."""
    partial = target.with_name(f".{target.name}.partial")
    writer = SafetensorsStreamWriter(partial, entries)
    try:
        with open_shard(source) as tensors:
            for name, _shape, dtype in entries:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                tensor = tensors[name].to(getattr(torch, dtype))
                writer.write(name, tensor)
                progress(tensor.numel() * tensor.element_size())
        writer.close()
    except BaseException:
        writer.abort()
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)


def _check_out(out: Path, allowed: set[str]) -> None:
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in allowed and not (p.name.startswith(".") and p.name.endswith(".partial")))
    if foreign:
        raise ModelError(f"{out} holds other files ({', '.join(foreign[:3])}); convert into an empty folder.")


def convert_to_safetensors(src: Path, out: Path, progress: Optional[Progress] = None, cancel=None,
                           dtype: Optional[str] = None) -> Path:
    """Write the GeoPixel checkpoint in ``src`` as safetensors into ``out`` (empty, or holding an
    interrupted conversion of the same source, which resumes at the first unfinished shard).

    The dead adapters, SAM-2's video parts and stale buffers are left out; ``dtype`` (``bfloat16``
    or ``float32``) casts the floats, None keeps the stored type. ``progress(done, total)`` counts
    bytes written; ``cancel.raise_if_cancelled()`` is checked between tensors. Tokenizer files,
    config.json and generation_config.json are copied; the index is written last, so a folder with
    ``model.safetensors.index.json`` is complete. Returns ``out``.
    """
    src, out = Path(src), Path(out)
    if dtype not in (None, "bfloat16", "float32"):
        raise ModelError(f"dtype must be bfloat16 or float32, got {dtype!r}.")
    files = index_shards(src, src / BIN_INDEX, _AGAIN) if (src / BIN_INDEX).is_file() else checkpoint_files(src)
    hf_config = read_config_json(src)
    plan = _plan(files)
    if dtype is not None:
        plan = [(p, n, [(name, shape, dtype if _is_float(d) else d) for name, shape, d in entries])
                for p, n, entries in plan]
    GeoPixelConfig.from_checkpoint(hf_config, {name: shape for *_, entries in plan for name, shape, _ in entries})
    out.mkdir(parents=True, exist_ok=True)
    _check_out(out, {name for _, name, _ in plan} | set(COPIED_FILES) | {SAFETENSORS_INDEX})
    sizes = [sum(math.prod(shape) * DTYPES[d] for _, shape, d in entries) for *_, entries in plan]
    total, done = sum(sizes), 0
    todo = [(step, size) for step, size in zip(plan, sizes) if not _done(out / step[1], step[2])]
    needed = sum(size for _, size in todo)
    free = shutil.disk_usage(out).free
    if needed > free:
        raise ModelError(f"Converting GeoPixel needs {needed / 1e9:.1f} GB free in {out}; only "
                         f"{free / 1e9:.1f} GB are. Free some space or choose another folder.")
    done = total - needed

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    for (source, name, entries), _size in todo:
        _write_shard(source, out / name, entries, advance, cancel)
    for name in COPIED_FILES:
        if (src / name).is_file():
            data = (src / name).read_bytes()
            if name == "config.json" and dtype is not None:
                data = (json.dumps({**hf_config, "torch_dtype": dtype}, indent=2, sort_keys=True) + "\n").encode()
            _write_atomic(out / name, data)
    weight_map = {entry[0]: name for _, name, entries in plan for entry in entries}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_atomic(out / SAFETENSORS_INDEX, (json.dumps(index, indent=2) + "\n").encode())
    if progress is not None:
        progress(total, total)
    return out


def _is_float(dtype: str) -> bool:
    return dtype in DTYPES


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
