"""Quantise a text GGUF through llama.cpp's own ``llama_model_quantize`` (via llama-cpp-python)."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

from ..errors import ModelError

# name -> llama_ftype (llama.h): Q8_0 = 7, Q4_K_M = 15
QUANT_TYPES = {"q8_0": 7, "q4_k_m": 15}


def check_quant(quant: str) -> int:
    """The llama.cpp file type for ``quant``; ModelError for an unknown name."""
    try:
        return QUANT_TYPES[quant.lower()]
    except KeyError:
        raise ModelError(f"Unknown quantisation {quant!r}: use one of {', '.join(QUANT_TYPES)}.") from None


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int = 0) -> Path:
    """Write ``dst``, a ``quant`` copy of the float GGUF ``src``; returns ``dst``.

    Tensors whose rows do not fit a k-quant block fall back to another type (llama.cpp's rule);
    1-D tensors stay float. ``threads`` 0: llama.cpp's default. llama.cpp's per-tensor log goes
    to a temporary file; its last lines are in the error message when quantisation fails.
    """
    ftype = check_quant(quant)
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelError("Quantising needs llama-cpp-python: pip install llama-cpp-python.") from exc
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    tmp = dst.with_name(dst.name + ".partial")
    # llama.cpp logs through llama-cpp-python's callback (sys.stderr) or straight to fd 2
    python_log = io.StringIO()
    with tempfile.TemporaryFile() as native_log, contextlib.redirect_stderr(python_log):
        saved = os.dup(2)
        os.dup2(native_log.fileno(), 2)
        try:
            status = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), params)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        native_log.seek(0)
        lines = (native_log.read().decode("utf-8", "replace") + python_log.getvalue()).strip().splitlines()
    tail = " | ".join(lines[-3:])
    if status != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ModelError(f"llama.cpp could not quantise {src.name} to {quant} (status {status}: {tail}); "
                         "check that it is a valid text GGUF and that the disk has space.")
    os.replace(tmp, dst)
    return dst
