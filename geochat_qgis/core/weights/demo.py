"""The tiny demo models, built locally so the plugin runs end to end before any real model is
downloaded: a random-weight GeoChat GGUF (llama.cpp, no torch) and a random-weight GeoPixel in
the published checkpoint's layout (the geopixel backend: torch). Their answers are random: they
prove the plumbing (boxes, masks becoming polygons), not the model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from ...__about__ import version
from .catalog import PathLike, cache_root
from .demo_gguf import write_demo_gguf
from .locks import exclusive
from .output_dir import staged_output_dir

DEMO_NAME = "tiny-demo"
DEMO_NOTE = "tiny demo model with random weights: its answers are random, not real findings"
DEMO_GEOPIXEL_NAME = "tiny-geopixel-demo"
DEMO_GEOPIXEL_TITLE = "Tiny GeoPixel demo (random masks)"
DEMO_GEOPIXEL_NOTE = ("tiny GeoPixel demo with random weights (geopixel backend, CPU): its masks "
                      "are random, not real findings")
_BUILT = ".geochat-demo.json"  # which plugin version built the folder


def demo_model_dir(cache: Optional[PathLike] = None) -> Path:
    """The demo GGUF folder (model.gguf + mmproj.gguf), built on first use (a second, no torch:
    :mod:`demo_gguf`)."""
    folder = cache_root(cache) / DEMO_NAME
    if not (folder / "model.gguf").is_file() or not (folder / "mmproj.gguf").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # a half-built folder of an older version: build it anew
            shutil.rmtree(folder)
        write_demo_gguf(folder, seed=0)
    return folder


def _built_by_this_version(folder: Path) -> bool:
    try:
        return json.loads((folder / _BUILT).read_text(encoding="utf-8")).get("version") == version()
    except (OSError, ValueError, AttributeError):
        return False


def demo_geopixel_dir(cache: Optional[PathLike] = None) -> Path:
    """The tiny GeoPixel folder (config.json, shard index, .bin shards, tokenizer files with
    [SEG], <p>, </p>), built on first use by the project's tiny maker (torch; a few seconds) and
    again after a plugin update; written beside its place and renamed in, so a half-built folder
    is never used."""
    folder = cache_root(cache) / DEMO_GEOPIXEL_NAME
    if _built_by_this_version(folder):
        return folder
    from ..models.geopixel.tiny import write_tiny_geopixel

    with exclusive(folder):
        if _built_by_this_version(folder):  # another process built it meanwhile
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        with staged_output_dir(folder) as stage:
            write_tiny_geopixel(stage, seed=0, seg_answer=True)
            (stage / _BUILT).write_text(json.dumps({"version": version()}), encoding="utf-8")
    return folder
