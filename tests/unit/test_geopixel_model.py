"""GeoPixelModel: a real tile and a question in, GeoPixel's reply and one mask per [SEG] out."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from geochat_qgis.core.cancel import CancelToken  # noqa: E402
from geochat_qgis.core.errors import Cancelled, ModelError  # noqa: E402
from geochat_qgis.core.families import get_family  # noqa: E402
from geochat_qgis.core.models.geopixel.modeling import GeoPixelModel, resolve_device, resolve_dtype  # noqa: E402
from geopixel_fixtures import real_tile, tiny_geopixel_demo, tiny_geopixel_twice  # noqa: E402,F401


@pytest.fixture(scope="module")
def demo(tiny_geopixel_demo: Path) -> GeoPixelModel:
    return GeoPixelModel.from_folder(tiny_geopixel_demo, dtype="float32")


def test_a_demo_answer_is_one_phrase_and_its_mask_at_the_tiles_size(demo: GeoPixelModel) -> None:
    tile = real_tile(300, 520)  # not square: it goes in as it is, GeoPixel pads it itself
    steps: list[int] = []
    answer = demo.answer(tile, "Could you segment the road?", max_new_tokens=16, on_token=steps.append,
                         want_logits=True)
    assert answer.text == "<p> a </p> [SEG]" and answer.stop == "eos"
    assert steps == answer.token_ids and answer.token_ids[-1] == demo.config.eos_token_id
    assert answer.mask_logits.shape == (1, 300, 520) and answer.mask_logits.dtype == np.float32
    assert answer.seg_hidden.shape == (1, demo.config.text.hidden_size)
    assert answer.step_logits.shape == (len(answer.token_ids), demo.config.text.vocab_size)
    assert answer.prompt_tokens > 2 * 400  # image embeddings (a 2 x 1 crop grid + the global view) + text
    positive = (answer.mask_logits > 0).mean()
    assert 0.0 < positive < 1.0  # a mask, neither empty nor everything
    parsed = get_family("geopixel").parse(answer.text, (520, 300), answer.mask_logits)
    assert [d.phrase for d in parsed.detections] == ["a"]
    assert parsed.detections[0].geometry.area == pytest.approx(positive * 300 * 520, rel=0.05)


def test_every_seg_fed_back_gives_a_mask(tiny_geopixel_twice: Path) -> None:
    model = GeoPixelModel.from_folder(tiny_geopixel_twice, dtype="float32")
    answer = model.answer(real_tile(400, 400), "Describe the image.", max_new_tokens=9)
    assert answer.text.count("[SEG]") == 2 and answer.stop == "length"
    assert answer.mask_logits.shape == (2, 400, 400)
    cut = model.answer(real_tile(400, 400), "Describe the image.", max_new_tokens=8)
    assert cut.text.count("[SEG]") == 2 and cut.mask_logits.shape[0] == 1  # the last [SEG] was never fed


def test_several_tiles_at_once_answer_as_one_by_one(demo: GeoPixelModel) -> None:
    tiles = [real_tile(256, 256, 100, 100), real_tile(200, 330, 500, 40)]
    together = demo.answer_many(tiles, ["Segment a.", "Describe."], [(), (("Hi", "Hello"),)], 12)
    for tile, query, history, joint in zip(tiles, ["Segment a.", "Describe."], [(), (("Hi", "Hello"),)], together):
        alone = demo.answer(tile, query, history, 12)
        assert joint.token_ids == alone.token_ids and joint.text == alone.text
        assert joint.mask_logits.shape == alone.mask_logits.shape == (1, *tile.shape[:2])
        np.testing.assert_allclose(joint.mask_logits, alone.mask_logits, atol=1e-4)


def test_bfloat16_gives_the_same_answer(tiny_geopixel_demo: Path, demo: GeoPixelModel) -> None:
    half = GeoPixelModel.from_folder(tiny_geopixel_demo, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    tile = real_tile(280, 280)
    a, b = half.answer(tile, "Segment a.", max_new_tokens=8), demo.answer(tile, "Segment a.", max_new_tokens=8)
    assert a.text == b.text and a.mask_logits.shape == b.mask_logits.shape
    agree = ((a.mask_logits > 0) == (b.mask_logits > 0)).mean()
    assert agree > 0.9, agree


def test_cancel_stops_the_answer(demo: GeoPixelModel) -> None:
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        demo.answer(real_tile(100, 100), "Segment a.", cancel=cancel)


def test_devices_and_types_are_checked() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("float32") is torch.float32
    with pytest.raises(ModelError, match="Unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ModelError, match="Unknown dtype 'float16'"):
        resolve_dtype("float16")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="sees no CUDA GPU.*use device cpu"):
            resolve_device("cuda")
