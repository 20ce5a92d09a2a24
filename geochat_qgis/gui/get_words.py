"""How the Get dialog words a model get: sizes, durations, a progress line per phase, a choice."""
from __future__ import annotations

from typing import Optional

PHASES = {"download": "Download", "convert": "Convert", "quantize": "Quantise", "verify": "Verify"}
UNITS = {"download": "bytes", "verify": "bytes", "convert": "tensors", "quantize": "steps"}


def human_bytes(n: Optional[float]) -> str:
    n = float(n or 0)
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def human_seconds(s: Optional[float]) -> str:
    if s is None:
        return ""
    s = int(s)
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else (
        f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s")


def describe_progress(event: dict) -> str:
    """One line for a get_model event: done of total, rate, time left."""
    phase, done, total = event.get("phase", ""), event.get("done") or 0, event.get("total")
    if UNITS.get(phase) == "bytes":
        text = human_bytes(done) + (f" of {human_bytes(total)}" if total else "")
        rate = f"{human_bytes(event['rate'])}/s" if event.get("rate") else ""
    else:
        text = f"{done}" + (f" of {total}" if total else "") + f" {UNITS.get(phase, '')}"
        rate = f"{event['rate']:.1f}/s" if event.get("rate") else ""
    left = human_seconds(event.get("eta"))
    return " · ".join(p for p in (text, rate, f"{left} left" if left else "") if p)


def choice_label(choice: dict) -> str:
    what = ("as published" if choice["target"] == "download" else
            f"GGUF {choice['quant']} (llama.cpp)" if choice["target"] == "gguf" else
            "HF checkpoint (transformers, vLLM)")
    runs = ", ".join(choice.get("backends") or []) or "no backend here"
    size = f", {human_bytes(choice['bytes'])}" if choice.get("bytes") else ""
    got = " (got)" if choice.get("installed") else ""
    return f"{what}{size}; runs here: {runs}{got}"
