"""Shared by the weights tests: a tiny GeoChat checkpoint and its tensors read directly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geochat_qgis.cli import main
from geochat_qgis.core.weights.checkpoint_io import open_tensors
from geochat_qgis.core.weights.tensor_data import bf16_to_f32
from geochat_qgis.core.weights.tiny import build_tiny_geochat


QUESTION = "[refer] Give me the location of <p> car </p>"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny GeoChat-layout checkpoint (with clip/), built once per test module."""
    return build_tiny_geochat(tmp_path_factory.mktemp("geochat") / "ckpt", "geochat-checkpoint")


def _files(ckpt: Path, with_clip: bool) -> list[tuple[str, Path]]:
    files = [("", shard) for shard in sorted(ckpt.glob("pytorch_model-*.bin"))]
    return files + ([("clip.", ckpt / "clip" / "model.safetensors")] if with_clip else [])


def original_arrays(ckpt: Path, with_clip: bool = True) -> dict[str, np.ndarray]:
    """All tensors of the GeoChat shards (and of clip/, prefixed ``clip.``) as numpy copies
    (bfloat16 widened to float32), read with the project's numpy reader (test_torch_zip checks it
    against torch.load)."""
    state: dict[str, np.ndarray] = {}
    for prefix, path in _files(ckpt, with_clip):
        with open_tensors(path) as tensors:
            for name, t in tensors.items():
                state[prefix + name] = bf16_to_f32(t.array) if t.dtype == "bfloat16" else np.array(t.array)
    return state


def original_tensors(ckpt: Path, with_clip: bool = True) -> dict:
    """The same as torch tensors, read by torch itself (for tests that need torch anyway)."""
    import torch
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for prefix, path in _files(ckpt, with_clip):
        if path.suffix == ".bin":
            state.update(torch.load(path, weights_only=True))
        else:
            with safe_open(str(path), framework="pt") as handle:
                state.update({f"{prefix}{k}": handle.get_tensor(k) for k in handle.keys()})
    return state


def keys_bicubic_table(table: np.ndarray, grid_to: int) -> np.ndarray:
    """GeoChat's interpolated position table written out from the definition (CLS row kept, the
    square grid resized by the cubic convolution kernel a = -0.75 with align_corners=True, edge
    rows repeated), pixel by pixel in float64, then float32: the tests' own reference."""
    a = -0.75

    def kernel(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a if d < 2 else 0.0

    side = int(round((table.shape[0] - 1) ** 0.5))
    grid = table[1:].astype(np.float64).reshape(side, side, -1)
    taps = []
    for o in range(grid_to):
        x = o * (side - 1) / (grid_to - 1)
        base = int(np.floor(x))
        taps.append([(min(max(base + k, 0), side - 1), kernel(x - (base + k))) for k in (-1, 0, 1, 2)])
    out = np.zeros((grid_to, grid_to, grid.shape[2]))
    for y in range(grid_to):
        for x in range(grid_to):
            out[y, x] = sum(wy * wx * grid[iy, ix] for iy, wy in taps[y] for ix, wx in taps[x])
    return np.concatenate([table[:1], out.reshape(grid_to * grid_to, -1).astype(np.float32)])


@pytest.fixture(scope="module")
def hf_dir(ckpt: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "hf"
    assert main(["convert", "geochat", str(ckpt), str(out), "--to", "hf"]) == 0
    return out


@pytest.fixture(scope="module")
def processor(hf_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(hf_dir, backend="pil")


def random_image(seed: int, size: int = 504) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))
