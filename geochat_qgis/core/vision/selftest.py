"""Does the installed llama.cpp build encode images right? A start-up self-test.

The project writes a tiny random mmproj, computes its image embeddings exactly with its own
code, asks libmtmd for the same and compares (tolerance :data:`TOLERANCE`). The verdict is
cached per build (llama-cpp-python version and its shared libraries) and projector type in the
cache folder (``$GEOCHAT_CACHE`` or ``~/.cache/geochat-qgis``).

- ``mlp`` (GeoChat/LLaVA): every llama-cpp-python release since 0.3.10 fails it (llama.cpp's
  LLaVA graph appends CLS after the patches, ggml-org/llama.cpp #25814, and approximates GELU
  in float16), so GeoChat then runs on the project's encoder.
- ``qwen2.5vl_merger`` (Qwen2.5-VL), against core/vision/qwen_numpy.py: the stock 0.3.36 build
  is off by about 1.8e-3 (float16 im2col in its patch embedding and its float16 GELU table),
  so it fails; Qwen2.5-VL still runs on libmtmd (M-RoPE image positions) and says so.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .encoder import ImageEncoder
from .libmtmd import MtmdEncoder, mtmd_embeddings
from .qwen_numpy import embed
from .qwen_tiny import QwenDims, write_qwen_tiny_mmproj
from .tiny_gguf import ClipDims, write_mlp_mmproj

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
_CACHE_NAME = "libmtmd-selftest.json"


@dataclass(frozen=True)
class Verdict:
    """``ok``: libmtmd's embeddings agree with the project's within TOLERANCE."""

    ok: bool
    projector: str
    max_error: float
    build: str
    message: str


def build_id(use_gpu: bool = False) -> str:
    """llama-cpp-python's version plus the size and mtime of its shared libraries."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    parts = [llama_cpp.__version__, f"gpu={use_gpu}"]
    for item in sorted(lib.glob("*")) if lib.is_dir() else []:
        if item.is_file() and not item.is_symlink():
            stat = item.stat()
            parts.append(f"{item.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return "|".join(parts)


def cache_file() -> Path:
    root = os.environ.get("GEOCHAT_CACHE") or Path.home() / ".cache" / "geochat-qgis"
    return Path(root).expanduser() / _CACHE_NAME


def _read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_cache(entries: dict) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:  # a read-only home: the test simply runs again next time
        log.info("could not cache the libmtmd self-test verdict: %s", exc)


#: the projector types the self-test has an exact reference for
TESTED_PROJECTORS = ("mlp", "qwen2.5vl_merger")
#: Qwen self-test images (height, width): sides multiples of 28 and at least 8 merged tokens,
#: so neither Qwen's processor nor libmtmd resizes; both cross a 112-px window boundary
QWEN_IMAGES = ((112, 168), (224, 252))


def run_selftest(model, n_embd: int, projector: str = "mlp", use_gpu: bool = False) -> Verdict:
    """Run the self-test now (no cache). ``model``: a loaded llama_model pointer whose
    embedding width is ``n_embd`` (libmtmd needs a text model to attach the projector to)."""
    build = build_id(use_gpu)
    if projector == "mlp":
        return _run_mlp(model, n_embd, use_gpu, build)
    if projector == "qwen2.5vl_merger":
        return _run_qwen(model, n_embd, use_gpu, build)
    return Verdict(False, projector, float("inf"), build,
                   f"no exact reference for projector {projector!r}: not tested")


def _run_mlp(model, n_embd: int, use_gpu: bool, build: str) -> Verdict:
    projector = "mlp"
    dims = ClipDims()
    image = np.random.default_rng(5).integers(0, 256, (dims.image_size, dims.image_size, 3),
                                              dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="geochat-selftest-") as tmp:
        path = write_mlp_mmproj(Path(tmp) / "mmproj.gguf", n_embd, dims, seed=3)
        expected = ImageEncoder(path, device="cpu").embed(image)
        try:
            got = mtmd_embeddings(model, path, image, n_embd, use_gpu=use_gpu)
        except RuntimeError as exc:
            return Verdict(False, projector, float("inf"), build, f"libmtmd failed: {exc}")
    if got.shape != expected.shape:
        return Verdict(False, projector, float("inf"), build,
                       f"libmtmd gave {got.shape[0]} image embeddings, GeoChat has "
                       f"{expected.shape[0]}")
    error = float(np.abs(got - expected).max())
    ok = error <= TOLERANCE
    message = (f"libmtmd agrees with the project's encoder (max error {error:.2g})" if ok else
               f"libmtmd's image embeddings are off by up to {error:.3g} (tolerance "
               f"{TOLERANCE:g}): this llama.cpp build carries the LLaVA CLS-order bug or "
               "approximate GELU; the project's own encoder is used")
    return Verdict(ok, projector, error, build, message)


def _run_qwen(model, n_embd: int, use_gpu: bool, build: str) -> Verdict:
    """A tiny random Qwen2.5-VL mmproj: Qwen's own computation (core/vision/qwen_numpy.py,
    checked against transformers) against libmtmd's, with flash attention off as the
    backend's chat handler runs it."""
    projector = "qwen2.5vl_merger"
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in QWEN_IMAGES]
    error, scale = 0.0, 0.0
    with tempfile.TemporaryDirectory(prefix="geochat-selftest-") as tmp:
        path, vision = write_qwen_tiny_mmproj(Path(tmp) / "mmproj.gguf",
                                              QwenDims(n_embd=n_embd), seed=3)
        try:
            encoder = MtmdEncoder(model, path, n_embd, use_gpu=use_gpu, flash_attn=False,
                                  warmup=False)
        except RuntimeError as exc:
            return Verdict(False, projector, float("inf"), build, f"libmtmd failed: {exc}")
        try:
            for image in images:
                expected = embed(vision, image)
                try:
                    got = encoder.embed(image)
                except RuntimeError as exc:
                    return Verdict(False, projector, float("inf"), build,
                                   f"libmtmd failed: {exc}")
                if got.shape != expected.shape:
                    return Verdict(False, projector, float("inf"), build,
                                   f"libmtmd gave {got.shape[0]} image features for a "
                                   f"{image.shape[1]}x{image.shape[0]} image, Qwen2.5-VL has "
                                   f"{expected.shape[0]}")
                error = max(error, float(np.abs(got - expected).max()))
                scale = max(scale, float(np.abs(expected).max()))
        finally:
            encoder.close()
    ok = error <= TOLERANCE
    message = (f"libmtmd's Qwen2.5-VL image features agree with Qwen's own (max error "
               f"{error:.2g})" if ok else
               f"this llama.cpp build's Qwen2.5-VL image features differ from Qwen's own by up "
               f"to {error:.2g} (features up to {scale:.2g}; tolerance {TOLERANCE:g}; float16 "
               "in llama.cpp's patch embedding and GELU table): answers are close to, not "
               "exactly, Qwen2.5-VL's; Qwen's own code (transformers, e.g. vLLM serving the "
               "HF model through the OpenAI backend) is exact")
    return Verdict(ok, projector, error, build, message)


def libmtmd_verdict(model, n_embd: int, projector: str = "mlp", use_gpu: bool = False,
                    refresh: bool = False) -> Verdict:
    """The cached verdict for this build and projector type, running the self-test once."""
    key = f"{projector}|{build_id(use_gpu)}"
    entries = _read_cache()
    if not refresh and key in entries:
        try:
            return Verdict(**entries[key])
        except TypeError:
            pass
    verdict = run_selftest(model, n_embd, projector, use_gpu)
    log.info("libmtmd self-test (%s): %s", projector, verdict.message)
    if np.isfinite(verdict.max_error):
        entries[key] = asdict(verdict)
        _write_cache(entries)
    return verdict


def cached_verdict(projector: str = "mlp", use_gpu: bool = False) -> Optional[Verdict]:
    """The cached verdict without running anything (None when not tested yet)."""
    entry = _read_cache().get(f"{projector}|{build_id(use_gpu)}")
    return Verdict(**entry) if entry else None


def qwen_note(use_gpu: bool = True) -> str:
    """The cached Qwen2.5-VL verdict's message when libmtmd failed it, else "" (not tested yet,
    passed, or llama-cpp-python missing); reads the cache only."""
    try:
        verdict = cached_verdict("qwen2.5vl_merger", use_gpu)
    except ImportError:
        return ""
    return verdict.message if verdict is not None and not verdict.ok else ""
