"""The project's GeoPixel on CUDA (bench/gpu_suite.sh runs this file on a GPU machine): the tiny
GeoPixel (random weights, published layout, answering ``<p> a </p> [SEG]``) gives on the GPU what
it gives on the CPU: float32 within 1e-3 with the same tokens, bfloat16 the same tokens and
nearly the same masks, batched tiles the same as one at a time.

Runs where torch sees CUDA; ``GEOCHAT_TEST_DEVICE=cpu`` (the suite's --dry) runs the same steps
on the CPU against itself, to check the file."""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

DEVICE = os.environ.get("GEOCHAT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(DEVICE == "" or (DEVICE == "cuda" and not torch.cuda.is_available()),
                                reason="needs CUDA (or GEOCHAT_TEST_DEVICE=cpu to check the file)")
QUERY = "Could you provide a segmentation mask for the roofs in this image?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from geochat_qgis.core.models.geopixel.tiny import write_tiny_geopixel

    out = tmp_path_factory.mktemp("tiny-geopixel")
    return write_tiny_geopixel(out, seed=3, seg_answer="once")


@pytest.fixture(scope="module")
def tiles():
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, shape, dtype=np.uint8)
            for shape in ((1680, 1680, 3), (300, 500, 3), (900, 420, 3))]


@pytest.fixture(scope="module")
def on_cpu(folder, tiles):
    from geochat_qgis.core.models.geopixel.modeling import GeoPixelModel

    model = GeoPixelModel.from_folder(folder, device="cpu", dtype="float32")
    return [model.answer(tile, QUERY, max_new_tokens=8) for tile in tiles]


def load(folder, dtype: str):
    from geochat_qgis.core.models.geopixel.modeling import GeoPixelModel

    if DEVICE == "cuda":  # exact float32 matmuls, as on the CPU
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return GeoPixelModel.from_folder(folder, device=DEVICE, dtype=dtype)


def test_float32_on_the_device_is_the_cpus_answer(folder, tiles, on_cpu):
    model = load(folder, "float32")
    for tile, expected in zip(tiles, on_cpu):
        got = model.answer(tile, QUERY, max_new_tokens=8)
        assert got.token_ids == expected.token_ids and got.text == expected.text
        assert got.mask_logits.shape == expected.mask_logits.shape == (1, *tile.shape[:2])
        np.testing.assert_allclose(got.mask_logits, expected.mask_logits, atol=1e-3, rtol=1e-3)


def test_bfloat16_on_the_device_gives_the_same_tokens_and_nearly_the_same_masks(folder, tiles,
                                                                                 on_cpu):
    model = load(folder, "bfloat16")
    for tile, expected in zip(tiles, on_cpu):
        got = model.answer(tile, QUERY, max_new_tokens=8)
        assert got.token_ids == expected.token_ids
        agree = np.mean((got.mask_logits > 0) == (expected.mask_logits > 0))
        assert agree > 0.95, f"bf16 masks agree with float32 on {agree:.3f} of the pixels"


def test_batched_tiles_answer_as_one_at_a_time(folder, tiles):
    model = load(folder, "float32")
    one = [model.answer(tile, QUERY, max_new_tokens=8) for tile in tiles]
    many = model.answer_many(tiles, [QUERY] * len(tiles), max_new_tokens=8)
    for a, b in zip(one, many):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.mask_logits, b.mask_logits, atol=1e-3, rtol=1e-3)
