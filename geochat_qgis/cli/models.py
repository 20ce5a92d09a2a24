"""``models list|get|download|verify|remove|add``: the model catalog and the local model cache.

``models get NAME --to gguf --quant q4_k_m`` does what the dock's Get button does (the same core
function, ``core/weights/get.py``): it shows the plan, downloads, converts and reports the ready
model. The hub, token, offline mode and proxies come from the environment (HF_ENDPOINT,
HF_TOKEN, HF_HUB_OFFLINE, HTTPS_PROXY / HTTP_PROXY / NO_PROXY).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, TextIO

from ..core.weights.catalog import add_user_entry, load_catalog
from ..core.weights.get import remove_converted
from ..core.weights.listing import model_list
from ..core.weights.store import download_model, model_status, remove_model, verify_model
from .models_get import run_get


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", help="model cache folder (default $GEOCHAT_CACHE or "
                        "~/.cache/geochat-qgis)")
    parser.add_argument("--user-catalog", help="user catalog file (default "
                        "$GEOCHAT_USER_CATALOG or ~/.config/geochat-qgis/catalog.json)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="the catalog with sizes and what is downloaded")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    get = sub.add_parser("get", help="download and convert a model so it runs (resumes)")
    get.add_argument("name")
    get.add_argument("--to", choices=["gguf", "hf", "safetensors"], help="gguf (llama.cpp) or hf "
                     "(transformers, vLLM) for GeoChat; safetensors (the geopixel backend) for "
                     "GeoPixel; models used as downloaded take none")
    get.add_argument("--quant", choices=["q4_k_m", "q8_0", "f16"], help="GGUF only "
                     "(default q4_k_m)")
    get.add_argument("--endpoint", help="hub URL (default $GEOCHAT_HF_ENDPOINT, $HF_ENDPOINT "
                     "or https://huggingface.co)")
    get.add_argument("--hf-cache", help="Hugging Face cache to reuse files from (default "
                     "$HF_HUB_CACHE or ~/.cache/huggingface/hub)")
    get.add_argument("--plan", action="store_true", help="only show what it takes")
    get.add_argument("--json", action="store_true", help="machine-readable output")
    get.add_argument("--ignore-memory", action="store_true",
                     help="convert even when memory looks too small (it may swap)")
    get.add_argument("--delete-source", action="store_true",
                     help="delete the original downloads once converted")
    download = sub.add_parser("download", help="download a model (resumes partial files)")
    download.add_argument("name")
    download.add_argument("--endpoint", help="hub URL (default $GEOCHAT_HF_ENDPOINT or "
                          "https://huggingface.co)")
    verify = sub.add_parser("verify", help="check a downloaded model's sizes and sha256")
    verify.add_argument("name")
    remove = sub.add_parser("remove", help="delete a downloaded model, or with --to one "
                            "converted copy of it")
    remove.add_argument("name")
    remove.add_argument("--to", choices=["gguf", "hf", "safetensors"], help="the converted copy to delete")
    remove.add_argument("--quant", choices=["q4_k_m", "q8_0", "f16"])
    add = sub.add_parser("add", help="add your own model to the user catalog")
    add.add_argument("name")
    add.add_argument("--family", required=True, help="geochat, qwen2.5-vl, geopixel, ...")
    where = add.add_mutually_exclusive_group(required=True)
    where.add_argument("--path", help="a local folder holding the files")
    where.add_argument("--repo", help="a hub repository, owner/name")
    add.add_argument("--revision", default="main")
    add.add_argument("--model-file", help="the GGUF / weights file (role 'model')")
    add.add_argument("--mmproj-file", help="the vision projector GGUF (role 'mmproj')")
    add.add_argument("--file", action="append", default=[], help="any other file (repeatable)")
    add.add_argument("--backend", action="append", default=[], help="llama.cpp, transformers, ...")


class ProgressBar:
    """A one-line terminal progress bar: ``[#####.....]  45%  1.20/2.70 GB  12.3 MB/s``.

    On a non-terminal stream it prints a plain line every 10 %.
    """

    def __init__(self, label: str, stream: Optional[TextIO] = None, width: int = 30,
                 unit: str = "GB") -> None:
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.unit = unit  # "GB" for bytes, else a count of that unit (e.g. "tensors")
        self.started = time.monotonic()
        self.first_done: Optional[int] = None
        self.last_decile = -1
        self.tty = self.stream.isatty()

    def __call__(self, done: int, total: Optional[int]) -> None:
        if self.first_done is None:
            self.first_done = done  # resumed bytes do not count towards the speed
        elapsed = max(time.monotonic() - self.started, 1e-6)
        speed = (done - self.first_done) / elapsed / 1e6
        fraction = done / total if total else 0.0
        if not self.tty:
            decile = int(fraction * 10)
            if decile != self.last_decile:
                self.last_decile = decile
                print(f"{self.label}: {fraction:4.0%} {self._amount(done, None)}", file=self.stream)
            return
        filled = int(self.width * fraction)
        bar = "#" * filled + "." * (self.width - filled)
        rate = f"  {speed:6.1f} MB/s" if self.unit == "GB" else ""
        self.stream.write(f"\r{self.label} [{bar}] {fraction:4.0%}  {self._amount(done, total)}{rate}")
        self.stream.flush()

    def _amount(self, done: int, total: Optional[int]) -> str:
        if self.unit != "GB":
            return f"{done}/{total} {self.unit}" if total else f"{done} {self.unit}"
        return f"{done / 1e9:.2f}/{total / 1e9:.2f} GB" if total else f"{done / 1e9:.2f} GB"

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _size(entry) -> str:
    return f"{entry.total_bytes / 1e9:.1f} GB" if entry.total_bytes else "?"


def _runs_here(listed: dict) -> str:
    """``gguf q4_k_m: llama.cpp`` for what is got, else what a get would give, per choice."""
    parts = []
    for choice in listed.get("choices", []):
        name = choice["target"] if choice["quant"] is None else f"{choice['target']}-{choice['quant']}"
        if choice["target"] == "download":
            name = "as is"
        ready = "ready: " if choice["installed"] else ""
        parts.append(f"{ready}{name}: {','.join(choice['backends']) or '-'}")
    return "; ".join(parts)


def _list(catalog, cache, as_json: bool) -> int:
    listed = {row["name"]: row for row in model_list(cache, catalog)}
    rows = [{
        "name": e.name, "family": e.family, "backends": list(e.backends), "size": _size(e),
        "status": model_status(e, cache), "license": e.license, "min_ram_gb": e.min_ram_gb,
        "min_vram_gb": e.min_vram_gb, "source": str(e.local_path or e.repo), "title": e.title,
        "folder": str(e.local_dir(cache)), "convert": e.convert,
        "ready": listed[e.name]["status"] == "ready", "choices": listed[e.name]["choices"],
    } for e in catalog]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':28} {'FAMILY':11} {'SIZE':>8} {'STATUS':10} {'BACKENDS':16} {'LICENCE':14} "
          "RUNS HERE")
    for row in rows:
        backends = ",".join(row["backends"]) or ("(convert)" if row["convert"] else "-")
        print(f"{row['name']:28} {row['family']:11} {row['size']:>8} {row['status']:10} "
              f"{backends:16} {row['license'] or '?':14} {_runs_here(listed[row['name']])}")
    return 0


def _add(args) -> int:
    files = []
    if args.model_file:
        files.append({"path": args.model_file, "role": "model"})
    if args.mmproj_file:
        files.append({"path": args.mmproj_file, "role": "mmproj"})
    files += [{"path": name} for name in args.file]
    raw = {"name": args.name, "family": args.family, "files": files,
           "backends": args.backend, "revision": args.revision}
    # a folder given on the command line is relative to here, not to the catalog file
    raw.update({"path": str(Path(args.path).resolve())} if args.path else {"repo": args.repo})
    path = add_user_entry(raw, args.user_catalog)
    print(f"added '{args.name}' to {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "add":
        return _add(args)
    catalog = load_catalog(args.user_catalog)
    if args.action == "list":
        return _list(catalog, args.cache, args.json)
    if args.action == "get":
        return run_get(args, catalog, ProgressBar)
    entry = catalog.get(args.name)
    if args.action == "download":
        bar = ProgressBar(entry.name)
        try:
            folder = download_model(entry, args.cache, args.endpoint, progress=bar)
        finally:
            bar.close()
        print(f"{entry.name}: ready in {folder}")
        if entry.convert:
            print(f"next: convert it, e.g. {entry.convert.get('command', '')}")
        return 0
    if args.action == "verify":
        checks = verify_model(entry, args.cache)
        for check in checks:
            print(f"{check.status:16} {check.path} {check.detail}".rstrip())
        bad = [c for c in checks if c.status not in ("ok", "unverified")]
        if any(c.status != "missing" for c in bad):
            print(f"{entry.name}: damaged file(s); fetch them again with "
                  f"`models remove {entry.name}` then `models download {entry.name}`",
                  file=sys.stderr)
        elif bad:
            print(f"{entry.name}: {len(bad)} file(s) missing; run "
                  f"`models download {entry.name}`", file=sys.stderr)
        return 1 if bad else 0
    if args.to:
        freed = remove_converted(entry.name, args.to, args.quant, args.cache, catalog)
        print(f"{entry.name} ({args.to} {args.quant or ''}): removed, {freed / 1e9:.2f} GB freed")
        return 0
    freed = remove_model(entry, args.cache)
    print(f"{entry.name}: removed, {freed / 1e9:.2f} GB freed")
    return 0
