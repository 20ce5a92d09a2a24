"""Hostile tiles for GeoChat's preprocessing and the project's image encoder.

GeoChat pads to a square, then resizes with PIL's bicubic. That must stay exact for every shape
(1 px, one row, very elongated, huge) without building a square of gigabytes; anything that is
not an RGB uint8 tile is a clear error.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from geochat_qgis.core.errors import BackendError
from geochat_qgis.core.vision.bicubic import pad_resize
from geochat_qgis.core.vision.encoder import ImageEncoder
from geochat_qgis.core.vision.preprocess import GEOCHAT_PAD, geochat_image, pad_to_square
from geochat_qgis.core.vision.tiny_gguf import ClipDims, write_mlp_mmproj


def _pil(image: np.ndarray, size: int) -> np.ndarray:
    """GeoChat's own way: expand2square, then PIL bicubic."""
    square = Image.fromarray(pad_to_square(image, GEOCHAT_PAD), "RGB")
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))


def _tile(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (1, 300), (300, 1), (3, 1000), (1000, 3),
                                   (37, 2000), (2000, 37), (503, 504), (505, 504), (599, 600),
                                   (100, 60), (1200, 1100), (252, 1008)])
@pytest.mark.parametrize("size", [504, 56])
def test_pad_resize_is_pils_pad_then_resize_bit_for_bit(shape, size):
    image = _tile(*shape, seed=shape[0] * 7 + shape[1])
    assert np.array_equal(pad_resize(image, size, GEOCHAT_PAD), _pil(image, size))
    flat = np.full(shape + (3,), (250, 3, 128), np.uint8)  # edges between fill and colour
    assert np.array_equal(pad_resize(flat, size, GEOCHAT_PAD), _pil(flat, size))


def test_elongated_tile_beyond_the_pil_size_is_exact():
    image = _tile(6000, 90, seed=3)
    assert np.array_equal(geochat_image(image), _pil(image, 504))


@pytest.mark.parametrize("shape", [(20000, 300), (300, 20000)])
def test_huge_elongated_tile_needs_no_square_in_memory(shape):
    image = _tile(*shape, seed=4)
    tracemalloc.start()
    try:
        out = geochat_image(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (504, 504, 3) and out.dtype == np.uint8
    assert peak < 400 * 2 ** 20  # PIL's way pads to 20000 x 20000 x 3: 1.2 GB


def test_absurdly_long_tile_is_refused_clearly():
    with pytest.raises(BackendError, match="100001 x 1 px.*coarser resolution"):
        geochat_image(np.zeros((1, 100_001, 3), np.uint8))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = write_mlp_mmproj(tmp_path_factory.mktemp("mm") / "mmproj.gguf", 64, ClipDims())
    return ImageEncoder(path, device="cpu")


@pytest.mark.parametrize("tile", [
    np.zeros((56, 56), np.uint8), np.zeros((56, 56, 4), np.uint8), np.zeros((56, 56, 3), np.uint16),
    np.full((56, 56, 3), np.nan), np.zeros((3, 56, 56), np.uint8), np.zeros((1, 56, 56, 3), np.uint8),
], ids=["grey", "rgba", "uint16", "nan", "channels-first", "batch"])
def test_not_an_rgb_uint8_tile_is_a_clear_error(encoder, tile):
    with pytest.raises(BackendError, match="RGB uint8.*convert the tile to 8-bit RGB"):
        encoder.embed(tile)


def test_views_and_thin_tiles_encode_as_their_copies(encoder):
    big = _tile(112, 112, seed=5)
    view = big[::2, ::-2]
    assert np.array_equal(encoder.embed(view), encoder.encode_pixels(
        encoder.pixels(view.copy())))
    frozen = big.copy()
    frozen.flags.writeable = False
    assert np.array_equal(encoder.embed(frozen), encoder.embed(big))
    for shape in ((1, 1), (1, 500), (500, 1)):
        rows = encoder.embed(_tile(*shape))
        assert rows.shape == (16, 64) and np.isfinite(rows).all()


def test_libmtmd_never_reads_past_a_tile_that_is_not_rgb(encoder, tmp_path):
    """libmtmd reads width x height x 3 bytes: a grey tile was read past its end (RGBA and
    float tiles silently misread); each is now the same clear error as the project's encoder."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from geochat_qgis.core.vision.libmtmd import MtmdEncoder
    from geochat_qgis.core.vision.tiny_gguf import LlamaDims, write_llama_gguf

    text = write_llama_gguf(tmp_path / "text.gguf", LlamaDims(n_embd=64))
    llama = llama_cpp.Llama(str(text), n_ctx=256, n_threads=2, verbose=False)
    mtmd = MtmdEncoder(llama.model, encoder.vision.path, 64, n_threads=2)
    try:
        for tile in (np.zeros((56, 56), np.uint8), np.zeros((56, 56, 4), np.uint8),
                     np.full((56, 56, 3), 0.5)):
            with pytest.raises(BackendError, match="RGB uint8"):
                mtmd.embed(tile)
        with pytest.raises(BackendError, match="tile is empty"):
            mtmd.embed(np.zeros((0, 56, 3), np.uint8))
        assert mtmd.embed(_tile(56, 56)).shape == (16, 64)
        frozen = _tile(56, 56)
        frozen.flags.writeable = False  # a memory-mapped or cached tile (was a TypeError)
        assert np.array_equal(mtmd.embed(frozen), mtmd.embed(frozen.copy()))
    finally:
        mtmd.close()
        llama.close()
