"""``models get``: the plan, then download + convert with a progress line per phase."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Optional

from ..core.weights.get import delete_sources, get_model, source_cleanup
from ..core.weights.get_plan import plan_get

GB = 1e9
UNITS = {"convert": "tensors", "quantize": "steps"}


def _gb(value: Optional[float]) -> str:
    """A size for people: 4.70 GB, 12.3 MB, 596 kB."""
    if value is None:
        return "?"
    for unit, scale in (("GB", GB), ("MB", 1e6)):
        if value >= scale or unit == "MB" and value >= 1e5:
            return f"{value / scale:.2f} {unit}" if unit == "GB" else f"{value / scale:.1f} {unit}"
    return f"{value / 1e3:.0f} kB"


def print_plan(plan) -> None:
    """The plan in a few lines: downloads, outputs, disk, memory, problems."""
    what = plan.target if plan.quant is None else f"{plan.target} {plan.quant}"
    print(f"{plan.model_id} as {what}:")
    for source in plan.sources:
        here = source.present_bytes + source.hf_cache_bytes + source.partial_bytes
        extra = f", {_gb(source.hf_cache_bytes)} from the Hugging Face cache" \
            if source.hf_cache_bytes else ""
        print(f"  download {source.repo} ({(source.commit or source.revision)[:12]}): "
              f"{_gb(source.total_bytes)}, {_gb(here)} already here{extra}, "
              f"{_gb(source.fetch_bytes)} to fetch")
    for choice in plan.choices:
        mark = "*" if (choice.target, choice.quant) == (plan.target, plan.quant) else " "
        runs = ", ".join(choice.backends) or "nothing here"
        name = choice.target if choice.quant is None else f"{choice.target} {choice.quant}"
        size = "" if choice.target == "download" else f"{_gb(choice.bytes)}, "
        state = f" [installed: {choice.installed}]" if choice.installed else ""
        print(f" {mark} {name:14} {size}runs with: {runs}{state}")
    if plan.installed:
        print(f"  already installed in {plan.installed}")
    else:
        print(f"  disk: {_gb(plan.disk_needed)} needed (downloads {_gb(plan.download_bytes)} + "
              f"model {_gb(plan.output_bytes)} + temporary {_gb(plan.temp_bytes)}), "
              f"{_gb(plan.disk_free)} free in {plan.disk_folder}")
        if plan.memory_needed:
            print(f"  memory for the conversion: {_gb(plan.memory_needed)} needed, "
                  f"{_gb(plan.memory_available)} available")
    for note in plan.notes:
        print(f"  note: {note}")
    for problem in plan.problems:
        print(f"  problem: {problem}", file=sys.stderr)


class PhaseProgress:
    """A progress bar per phase (bytes for download and verify, steps otherwise)."""

    def __init__(self, bar_class: Callable[[str], Any]) -> None:
        self.bar_class, self.phase, self.bar = bar_class, None, None

    def __call__(self, phase: str, done: int, total: Optional[int], rate, eta) -> None:
        if phase != self.phase:
            self.close()
            unit = "GB" if phase in ("download", "verify") else UNITS.get(phase, "steps")
            self.phase, self.bar = phase, self.bar_class(phase, unit=unit)
        self.bar(done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_get(args: argparse.Namespace, catalog, bar_class) -> int:
    import logging

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its per-file INFO lines are noise here
    options = dict(catalog=catalog, endpoint=args.endpoint, hf_cache=args.hf_cache,
                   ignore_memory=args.ignore_memory)
    plan = plan_get(args.name, args.to, args.quant, args.cache, **options)
    if args.plan:
        if args.json:
            print(json.dumps(plan.to_dict(), indent=2))
        else:
            print_plan(plan)
        return 0 if plan.ok else 1
    if not args.json:
        print_plan(plan)
    progress = PhaseProgress(bar_class)
    try:
        model = get_model(args.name, args.to, args.quant, args.cache, on_progress=progress,
                          **options)
    finally:
        progress.close()
    freed = delete_sources(args.name, args.cache, catalog) if args.delete_source else 0
    if args.json:
        print(json.dumps({**model.to_dict(), "freed_bytes": freed}, indent=2))
        return 0
    print(f"{model.model_id}: ready in {model.folder} (runs with: "
          f"{', '.join(model.backends) or 'no backend installed here'})")
    if model.provenance.get("model_hash"):
        print(f"  model sha256 {model.provenance['model_hash']}")
    if args.delete_source:
        print(f"  original downloads deleted, {_gb(freed)} freed")
    else:
        offer = source_cleanup(args.name, args.cache, catalog)
        if offer.bytes:
            print(f"  the original downloads ({_gb(offer.bytes)}) are no longer needed to run "
                  f"it: `models get {args.name} --delete-source` deletes them")
    return 0
