"""The project's own GeoChat image encoder (core/vision) and the libmtmd self-test."""
from __future__ import annotations

import numpy as np
import pytest

from geochat_qgis.core.errors import ModelError
from geochat_qgis.core.vision import clip_numpy
from geochat_qgis.core.vision.encoder import ImageEncoder, tile_key
from geochat_qgis.core.vision.mmproj import read_mmproj
from geochat_qgis.core.vision.preprocess import geochat_image, pad_to_square
from geochat_qgis.core.vision.tiny_gguf import ClipDims, LlamaDims, write_llama_gguf, write_mlp_mmproj


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory):
    return write_mlp_mmproj(tmp_path_factory.mktemp("mm") / "mmproj.gguf", 64, ClipDims(), seed=1)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_pad_to_square_centres_like_expand2square():
    image = _image(3, 8)
    square = pad_to_square(image)
    assert square.shape == (8, 8, 3)
    assert (square[:2] == (122, 116, 104)).all() and (square[5:] == (122, 116, 104)).all()
    assert (square[2:5] == image).all()  # offset (8 - 3) // 2 = 2, as PIL's paste in GeoChat
    tall = pad_to_square(_image(9, 4))
    assert (tall[:, 2:6] == _image(9, 4)).all() and (tall[:, :2] == (122, 116, 104)).all()
    assert geochat_image(_image(100, 60)).shape == (504, 504, 3)


def test_erf_is_exact_to_float32():
    import math

    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    assert float(np.abs(clip_numpy.erf(x) - exact).max()) < 3e-7


def test_embeddings_are_cached_per_tile(mmproj):
    encoder = ImageEncoder(mmproj, device="cpu")
    tile = _image(56, 56)
    first = encoder.embed(tile)
    assert encoder.embed(tile.copy()) is first and encoder.encoded == 1
    assert encoder.embed(_image(56, 56, seed=1)).shape == (16, 64) and encoder.encoded == 2
    assert tile_key(tile) != tile_key(tile[:, ::-1])


def test_torch_path_computes_the_numpy_numbers(mmproj):
    pytest.importorskip("torch")
    from geochat_qgis.core.vision.clip_torch import TorchClip

    vision = read_mmproj(mmproj)
    encoder = ImageEncoder(mmproj, device="cpu")
    pixels = encoder.pixels(_image(70, 40))
    reference = clip_numpy.encode(vision, pixels)
    error = float(np.abs(TorchClip(vision, "cpu").encode(pixels) - reference).max())
    # float32 both ways, summed in another order: relative to the largest feature (an absolute
    # 1e-5 failed once at 1.0014e-5)
    scale = max(1.0, float(np.abs(reference).max()))
    assert error / scale < 1e-5, (error, scale)


def test_non_llava_projector_is_refused(tmp_path, mmproj):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "clip")
    writer.add_string("clip.projector_type", "qwen2.5vl_merger")
    writer.add_tensor("v.class_embd", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="qwen2.5vl_merger"):
        read_mmproj(tmp_path / "qwen.gguf")


def _cls_last(vision, pixels: np.ndarray) -> np.ndarray:
    """What llama.cpp 0.3.x's LLaVA graph computes: CLS appended after the patches while the
    position table is added in order, then rows 1.. projected (ggml-org/llama.cpp #25814)."""
    patches = clip_numpy.patchify(pixels, vision.patch_size) @ vision.patch
    x = np.concatenate([patches, vision.class_embd[None]]) + vision.position
    x = clip_numpy.layer_norm(x, vision.pre_ln, vision.eps)
    for layer in vision.layers:
        x = x + clip_numpy._attention(clip_numpy.layer_norm(x, layer.ln1, vision.eps), layer,
                                      vision.heads)
        hidden = clip_numpy.quick_gelu(clip_numpy.layer_norm(x, layer.ln2, vision.eps)
                                       @ layer.up[0] + layer.up[1])
        x = x + hidden @ layer.down[0] + layer.down[1]
    return clip_numpy.gelu(x[1:] @ vision.mm0[0] + vision.mm0[1]) @ vision.mm2[0] + vision.mm2[1]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = write_llama_gguf(tmp_path_factory.mktemp("text") / "text.gguf", LlamaDims(n_embd=64))
    llama = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    yield llama
    llama.close()


def test_stock_libmtmd_computes_the_cls_last_graph(mmproj, text_model):
    """The self-test's finding is llama.cpp's known bug, not a difference in our reading of
    the mmproj: libmtmd's numbers equal the CLS-last computation up to its float16 GELU."""
    from geochat_qgis.core.vision.libmtmd import mtmd_embeddings

    vision = read_mmproj(mmproj)
    image = _image(56, 56, seed=4)
    pixels = ImageEncoder(mmproj, device="cpu").pixels(image)
    theirs = mtmd_embeddings(text_model.model, mmproj, image, 64, n_threads=2)
    exact = clip_numpy.encode(vision, pixels)
    bugged = _cls_last(vision, pixels)
    scale = float(np.abs(exact).max())
    if float(np.abs(theirs - exact).max()) > 1e-4:
        assert float(np.abs(theirs - bugged).max()) < 5e-3 * scale


def test_selftest_verdict_is_cached_per_build(text_model, tmp_path, monkeypatch):
    import llama_cpp

    from geochat_qgis.core.vision import selftest

    monkeypatch.setenv("GEOCHAT_CACHE", str(tmp_path))
    verdict = selftest.libmtmd_verdict(text_model.model, 64)
    if llama_cpp.__version__ == "0.3.36":
        assert not verdict.ok and verdict.max_error > 0.1
    assert selftest.cache_file().is_file()
    assert selftest.cached_verdict() == verdict

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached verdict should be used")

    monkeypatch.setattr(selftest, "run_selftest", must_not_run)
    assert selftest.libmtmd_verdict(text_model.model, 64) == verdict
    monkeypatch.undo()
    untested = selftest.run_selftest(text_model.model, 64, projector="ldpv2")
    assert not untested.ok and "not tested" in untested.message
