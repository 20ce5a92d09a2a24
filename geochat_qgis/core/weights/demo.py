"""The tiny demo model: a random-weight GeoChat GGUF built locally, so the plugin runs end to end
before any real model is downloaded. Its answers are random: it proves the plumbing, not the
model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .catalog import PathLike, cache_root

DEMO_NAME = "tiny-demo"
DEMO_NOTE = "tiny demo model with random weights: its answers are random, not real findings"


def demo_model_dir(cache: Optional[PathLike] = None) -> Path:
    """The demo GGUF folder (model.gguf + mmproj.gguf), built on first use (a second, no torch:
    :mod:`demo_gguf`)."""
    folder = cache_root(cache) / DEMO_NAME
    if not (folder / "model.gguf").is_file() or not (folder / "mmproj.gguf").is_file():
        from .demo_gguf import write_demo_gguf

        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # a half-built folder of an older version: build it anew
            import shutil

            shutil.rmtree(folder)
        write_demo_gguf(folder, seed=0)
    return folder
