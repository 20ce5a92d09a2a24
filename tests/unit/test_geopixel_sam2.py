"""GeoPixel's SAM-2 mask head against arrays GeoPixel's own code made (tests/data/geopixel/README.md,
sam_tiny.npz): a tiny random SAM-2 + text_hidden_fcs drawn by name (sam2_random) on both sides,
two tiles (48x80 upscaled, 1200x1040 downscaled), float32 within 1e-4 and GeoPixel's bf16 run."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from geochat_qgis.core.errors import BackendError, ModelError
from geochat_qgis.core.models.geopixel.sam2_config import Sam2Config, global_blocks
from geochat_qgis.core.models.geopixel.sam2_random import random_tensor
from geochat_qgis.core.models.geopixel.sam2_unused import is_unused, unused_checkpoint_shapes

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from geochat_qgis.core.models.geopixel.sam2 import (  # noqa: E402 (needs torch)
    GeoPixelSam2, checkpoint_shapes, checkpoint_tensors, expected_shapes, load_state)
from geochat_qgis.core.models.geopixel.sam2_image import sam2_pixels  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "geopixel" / "sam_tiny.npz"
TILES = ("a", "b")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(DATA) as npz:
        return {k: npz[k] for k in npz.files}


def _shapes(ref, key: str = "state_shapes") -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads(str(ref[key])).items()}


def _reference_tensors(ref) -> dict[str, torch.Tensor]:
    """The weights GeoPixel's run had: random_tensor by name, times the script's few scales."""
    scales = json.loads(str(ref["weight_scales"]))
    return {name: torch.from_numpy(random_tensor(name, shape, int(ref["seed"])) * scales.get(name, 1.0))
            for name, shape in _shapes(ref).items()}


@pytest.fixture(scope="module")
def model(ref) -> GeoPixelSam2:
    with torch.device("meta"):
        module = GeoPixelSam2(Sam2Config.tiny(int(ref["hidden_size"])))
    load_state(module, _reference_tensors(ref))
    return module


@pytest.fixture(scope="module")
def model_bf16(model) -> GeoPixelSam2:
    return copy.deepcopy(model).to(torch.bfloat16)


def _tile(ref, name: str) -> np.ndarray:
    height, width, repeat = ref[f"{name}_tile_shape"]
    small = ref[f"{name}_tile_small"]
    return np.ascontiguousarray(small.repeat(repeat, 0).repeat(repeat, 1)[:height, :width])


@pytest.fixture(scope="module")
def runs(ref, model, model_bf16) -> dict[str, tuple]:
    """(features, low-res, iou, masks) per tile and dtype; f32 tiles encoded in one batch."""
    tiles = [_tile(ref, name) for name in TILES]
    out = {}
    batch = model.encode_tiles(tiles)
    for index, name in enumerate(TILES):
        hidden = torch.from_numpy(ref[f"{name}_hidden"])
        out[f"{name}_f32"] = (batch, index) + model.decode(batch, index, hidden)
        features = model_bf16.encode_tiles([tiles[index]])
        out[f"{name}_bf16"] = (features, 0) + model_bf16.decode(features, 0, hidden)
    return out


def _close(ours: torch.Tensor, theirs: np.ndarray, atol: float) -> None:
    np.testing.assert_allclose(ours.detach().float().numpy(), theirs, rtol=0, atol=atol)


def _bits(ref, key: str, shape) -> np.ndarray:
    return np.unpackbits(ref[key])[: int(np.prod(shape))].reshape(shape).astype(bool)


def test_names_and_shapes_are_geopixels_sam2base(ref):
    """Our tensors + the unused video parts == GeoPixel's SAM2Base + text_hidden_fcs, tiny and Hiera-L."""
    tiny = Sam2Config.tiny(int(ref["hidden_size"]))
    assert checkpoint_shapes(tiny) == _shapes(ref)
    large = _shapes(ref, "large_state_shapes")
    assert len(large) == 900
    ours = checkpoint_shapes(Sam2Config())
    assert {k: v for k, v in ours.items() if k.startswith("model.visual_model.")} == large
    assert set(unused_checkpoint_shapes(Sam2Config())) == {k for k in large if is_unused(k)}


def test_config_from_shapes_tiny_and_hiera_large(ref):
    tiny = Sam2Config.tiny(int(ref["hidden_size"]))
    assert Sam2Config.from_checkpoint({"hidden_size": 64}, _shapes(ref)) == tiny
    assert tiny.global_att_blocks == (7,) and tiny.window_spec == (8, 4, 16, 8)
    large_shapes = {**_shapes(ref, "large_state_shapes"),
                    "model.text_hidden_fcs.0.0.weight": (4096, 4096), "model.text_hidden_fcs.0.2.weight": (256, 4096)}
    large = Sam2Config.from_checkpoint({"hidden_size": 4096}, large_shapes)
    assert large == Sam2Config()  # sam2_hiera_l.yaml: embed 144, stages 2/6/36/4, global 23/33/43
    assert (large.stages, large.global_att_blocks, large.d_model) == ((2, 6, 36, 4), (23, 33, 43), 256)
    assert global_blocks((2, 6, 36, 4)) == (23, 33, 43)


def test_config_refuses_what_is_not_geopixels_layout(ref):
    shapes = _shapes(ref)
    with pytest.raises(ModelError, match="pos_embed_window"):
        Sam2Config.from_checkpoint({}, {k: v for k, v in shapes.items() if not k.endswith("pos_embed_window")})
    wrong = {**shapes, "model.text_hidden_fcs.0.2.weight": (16, 64)}
    with pytest.raises(ModelError, match="16-wide prompts but SAM-2 is 32 wide"):
        Sam2Config.from_checkpoint({}, wrong)
    with pytest.raises(ModelError, match="language model is 128"):
        Sam2Config.from_checkpoint({"hidden_size": 128}, shapes)


def test_load_state_names_what_is_wrong(ref):
    tensors = _reference_tensors(ref)
    config = Sam2Config.tiny(64)
    with torch.device("meta"):
        module = GeoPixelSam2(config)
    missing = dict(tensors)
    del missing["model.visual_model.sam_mask_decoder.output_upscaling.1.weight"]
    with pytest.raises(ModelError, match=r"lacks 'model.visual_model.sam_mask_decoder.output_upscaling.1.weight'"):
        load_state(module, missing)
    with pytest.raises(ModelError, match="'model.visual_model.stray' is not part of SAM-2"):
        load_state(module, {**tensors, "model.visual_model.stray": torch.zeros(1)})
    bad = {**tensors, "model.visual_model.no_mem_embed": torch.zeros(1, 1, 16)}
    with pytest.raises(ModelError, match=r"no_mem_embed' is \(1, 1, 16\), SAM-2 here expects \(1, 1, 32\)"):
        load_state(module, bad)
    # unused video parts are never read: a mapping that fails on reading them still loads
    class NoVideo(dict):
        def __getitem__(self, name):
            assert not is_unused(name), name
            return super().__getitem__(name)

    load_state(module, NoVideo(tensors))
    assert not any(t.is_meta for t in module.state_dict().values())


def test_checkpoint_tensors_round_trip():
    config = dataclasses.replace(Sam2Config.tiny(16), global_att_blocks=(7,))
    torch.manual_seed(3)
    first = GeoPixelSam2(config)
    second = GeoPixelSam2(config)
    load_state(second, {**checkpoint_tensors(first), **{n: torch.zeros(s) for n, s in
                                                        unused_checkpoint_shapes(config).items()}})
    for name, tensor in checkpoint_tensors(first).items():
        assert torch.equal(tensor, checkpoint_tensors(second)[name]), name
    assert expected_shapes(config) == {n: tuple(t.shape) for n, t in checkpoint_tensors(first).items()}


@pytest.mark.parametrize("name", TILES)
def test_pixels_are_geopixels_transform(ref, name):
    pixels = sam2_pixels(_tile(ref, name))
    assert pixels.shape == (3, 1024, 1024) and pixels.dtype == torch.float32
    _close(pixels[:, ::16, ::16], ref[f"{name}_f32_pixels_sub"], 1e-6)
    assert abs(pixels.double().sum().item() - ref[f"{name}_f32_pixels_stats"][0]) < 1e-2


@pytest.mark.parametrize("name", TILES)
def test_f32_features_and_masks_match_geopixel(ref, runs, model, name):
    features, index, low_res, iou, masks = runs[f"{name}_f32"]
    key = f"{name}_f32"
    embed = features.image_embed[index]
    _close(embed[:, ::8, ::8], ref[f"{key}_image_embed_sub"], 1e-4)
    assert abs(embed.double().sum().item() - ref[f"{key}_image_embed_stats"][0]) < 1e-2
    _close(features.high_res[0][index, :, ::16, ::16], ref[f"{key}_s0_sub"], 1e-4)
    _close(features.high_res[1][index, :, ::8, ::8], ref[f"{key}_s1_sub"], 1e-4)
    _close(model.sam_prompt_encoder.dense_pe()[0, :, ::4, ::4], ref[f"{key}_image_pe_sub"], 0)
    _close(model.seg_prompts(torch.from_numpy(ref[f"{name}_hidden"])), ref[f"{key}_sparse"], 1e-4)
    _close(model.sam_prompt_encoder.dense_embeddings()[0, :, 0, 0], ref[f"{key}_dense"], 0)
    _close(low_res[:, 0, ::4, ::4], ref[f"{key}_low_res_sub"], 1e-4)
    _close(iou, ref[f"{key}_iou"], 1e-4)
    assert ((low_res[:, 0] > 0).numpy() == _bits(ref, f"{key}_low_res_bits", low_res[:, 0].shape)).all()
    height, width, _ = ref[f"{name}_tile_shape"]
    assert masks.shape == (len(ref[f"{name}_hidden"]), height, width) and masks.dtype == torch.float32
    _close(masks[:, ::16, ::16] if height * width > 10000 else masks, ref[f"{key}_masks_sub"], 1e-4)
    # binary masks identical except on numeric ties (|logit| < 1e-6: 1 to 3 pixels of 1.25 M for tile b)
    differ = (masks > 0).numpy() != _bits(ref, f"{key}_masks_bits", masks.shape)
    assert (np.abs(masks.numpy()[differ]) < 1e-5).all() and differ.mean() < 1e-5


@pytest.mark.parametrize("name", TILES)
def test_decoder_on_geopixels_exact_image_embed(ref, runs, model, name):
    """The decoder fed GeoPixel's own bf16-rounded image_embed: no f32 noise of the encoder left."""
    features, index = runs[f"{name}_f32"][:2]
    exact = torch.from_numpy(ref[f"{name}_f32_embeds_bf16"]).view(torch.bfloat16).float()
    fed = dataclasses.replace(features, image_embed=exact, sizes=[features.sizes[index]],
                              high_res=[level[index:index + 1] for level in features.high_res])
    low_res, _, masks = model.decode(fed, 0, torch.from_numpy(ref[f"{name}_hidden"]))
    _close(low_res[:, 0, ::4, ::4], ref[f"{name}_f32_low_res_sub"], 1e-4)


def test_dynamic_multimask_both_paths_covered(ref):
    """Tile a's first [SEG] falls back to the best multimask output, its second passes (0.98)."""
    stability = ref["a_f32_stability"]
    assert stability[0] < 0.98 < stability[1]


@pytest.mark.parametrize("name", TILES)
def test_bf16_as_geopixel_runs_it(ref, runs, name):
    """bf16 weights: the image maps bit-identical to GeoPixel's bf16 run (CPU autocast); the decoder
    (pure bf16 here) is no further from GeoPixel's bf16 logits than those are from its float32."""
    features, index, low_res, iou, masks = runs[f"{name}_bf16"]
    key = f"{name}_bf16"
    assert features.image_embed.dtype == torch.float32  # GeoPixel's neck keeps the top-down sum in f32
    _close(features.image_embed[index, :, ::8, ::8], ref[f"{key}_image_embed_sub"], 1e-6)
    _close(features.high_res[0][index, :, ::16, ::16], ref[f"{key}_s0_sub"], 1e-6)
    assert low_res.dtype == torch.bfloat16 and masks.dtype == torch.float32
    ours = low_res[:, 0, ::4, ::4].float().numpy()
    own_error = np.abs(ref[f"{key}_low_res_sub"] - ref[f"{name}_f32_low_res_sub"]).max()
    assert np.abs(ours - ref[f"{key}_low_res_sub"]).max() <= 1.5 * own_error
    agree = (low_res[:, 0].float() > 0).numpy() == _bits(ref, f"{key}_low_res_bits", low_res[:, 0].shape)
    assert agree.mean() > 0.985


def test_bad_tiles_and_no_seg(model):
    with pytest.raises(BackendError, match="empty"):
        sam2_pixels(np.zeros((0, 5, 3), np.uint8))
    features = model.encode_tiles([np.full((20, 30, 3), 90, np.uint8)])
    low_res, iou, masks = model.decode(features, 0, torch.zeros((0, 64)))
    assert masks.shape == (0, 20, 30) and low_res.shape[0] == 0
