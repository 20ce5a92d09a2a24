"""Shared by the weights tests: a tiny GeoChat checkpoint and its tensors read directly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from geochat_qgis.core.weights.tiny import build_tiny_geochat


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny GeoChat-layout checkpoint (with clip/), built once per test module."""
    return build_tiny_geochat(tmp_path_factory.mktemp("geochat") / "ckpt", "geochat-checkpoint")


def original_tensors(ckpt: Path, with_clip: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of the GeoChat shards (and of clip/, prefixed ``clip.``), read directly."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(ckpt.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, weights_only=True))
    if with_clip:
        with safe_open(str(ckpt / "clip" / "model.safetensors"), framework="pt") as handle:
            state.update({f"clip.{k}": handle.get_tensor(k) for k in handle.keys()})
    return state
