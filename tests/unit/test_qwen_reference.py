"""The project's numpy Qwen2.5-VL vision encoder against transformers' own, and its mmproj."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from geochat_qgis.core.errors import ModelError
from geochat_qgis.core.vision import qwen_numpy
from geochat_qgis.core.vision.qwen_mmproj import read_qwen_mmproj, write_qwen_mmproj
from geochat_qgis.core.vision.qwen_tiny import QwenDims, random_qwen_vision, write_qwen_tiny_mmproj

#: (height, width): two non-square, one square; all cross a 112-px attention window
SIZES = ((112, 168), (224, 252), (140, 140))


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def hf_model():
    """transformers' Qwen2.5-VL vision model, tiny, every weight random at unit scale."""
    torch = pytest.importorskip("torch", reason="torch is needed to run transformers' model")
    pytest.importorskip("transformers")
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    config = Qwen2_5_VLVisionConfig(depth=4, hidden_size=32, intermediate_size=48, num_heads=2,
                                    out_hidden_size=24, fullatt_block_indexes=[1, 3],
                                    window_size=112)
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and ("norm" in name or "ln_q" in name):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif param.ndim == 1:
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / param[0].numel() ** 0.5)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, qwen_numpy.from_state_dict(state, heads=2, full_blocks=(1, 3))


@pytest.mark.parametrize("height,width", SIZES)
def test_features_equal_transformers(hf_model, height, width):
    import torch

    model, vision = hf_model
    rows, grid_h, grid_w = qwen_numpy.pixels(vision, _image(height, width))
    with torch.no_grad():
        theirs = model(torch.from_numpy(rows),
                       grid_thw=torch.tensor([[1, grid_h, grid_w]])).pooler_output.numpy()
    ours = qwen_numpy.encode(vision, rows, grid_h, grid_w)
    assert ours.shape == theirs.shape == (height * width // 28 ** 2, 24)
    assert float(np.abs(ours - theirs).max()) < 1e-5  # measured 2.4e-6 to 3.2e-6
    assert float(np.abs(theirs).max()) > 1.0  # features of order one: the bound means something


def test_windows_and_rotary_positions_matter(hf_model, monkeypatch):
    """Without window attention or without rotary positions the features move by > 0.1, so
    the 1e-5 agreement above checks both."""
    _, vision = hf_model
    rows, grid_h, grid_w = qwen_numpy.pixels(vision, _image(224, 252))
    exact = qwen_numpy.encode(vision, rows, grid_h, grid_w)
    all_full = dataclasses.replace(vision, full_blocks=tuple(range(len(vision.blocks))))
    assert float(np.abs(qwen_numpy.encode(all_full, rows, grid_h, grid_w) - exact).max()) > 0.1
    cos, sin = qwen_numpy.rotary(vision, grid_h, grid_w)
    monkeypatch.setattr(qwen_numpy, "rotary", lambda *a: (np.ones_like(cos), np.zeros_like(sin)))
    assert float(np.abs(qwen_numpy.encode(vision, rows, grid_h, grid_w) - exact).max()) > 0.1
    order, bounds = qwen_numpy.windows(vision, grid_h, grid_w)
    assert sorted(order.tolist()) == list(range(grid_h * grid_w // 4))
    assert bounds[-1] == grid_h * grid_w and len(bounds) == 1 + 2 * 3  # 8 x 9 merged: 2 x 3


@pytest.mark.parametrize("height,width", SIZES)
def test_pixels_equal_qwens_image_processor(height, width):
    pytest.importorskip("PIL")
    processing = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

    image = _image(height, width, seed=3)
    out = processing.Qwen2VLImageProcessorPil()(images=[image], return_tensors="np")
    rows, grid_h, grid_w = qwen_numpy.pixels(random_qwen_vision(), image)
    assert out["image_grid_thw"].tolist() == [[1, grid_h, grid_w]]
    assert float(np.abs(out["pixel_values"] - rows).max()) < 1e-6  # measured 4.8e-7


def test_smart_resize_equals_transformers():
    processing = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

    rng = np.random.default_rng(0)
    for height, width in rng.integers(20, 3000, (300, 2)).tolist():
        assert qwen_numpy.smart_resize(height, width) == processing.smart_resize(height, width)


def test_images_that_need_a_resize_are_refused():
    with pytest.raises(ValueError, match="multiples of 28"):
        qwen_numpy.pixels(random_qwen_vision(), _image(100, 168))


def test_mmproj_round_trip_keeps_every_number(tmp_path):
    path, vision = write_qwen_tiny_mmproj(tmp_path / "mmproj.gguf", QwenDims(n_embd=40), seed=2)
    back = read_qwen_mmproj(path)
    assert back.full_blocks == vision.full_blocks == (1, 3)
    assert (back.heads, back.hidden, back.out_dim) == (2, 32, 40)
    assert np.float32(back.eps) == np.float32(vision.eps)
    image = _image(112, 168)
    assert np.array_equal(qwen_numpy.embed(back, image), qwen_numpy.embed(vision, image))


def test_mmproj_layouts_llama_cpp_cannot_hold_are_refused(tmp_path):
    vision = random_qwen_vision()
    with pytest.raises(ValueError, match="every n-th block"):
        write_qwen_mmproj(tmp_path / "a.gguf", dataclasses.replace(vision, full_blocks=(0, 3)))
    with pytest.raises(ModelError, match="qwen2.5vl_merger"):
        from geochat_qgis.core.vision.tiny_gguf import write_mlp_mmproj

        read_qwen_mmproj(write_mlp_mmproj(tmp_path / "mlp.gguf", 16))
