"""The geopixel backend: the project's own GeoPixel on the CPU, tiles at their own size, masks to
polygons through the family parser and the pipeline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from geochat_qgis.core.backends.base import Conversation, GenerateOptions, Turn  # noqa: E402
from geochat_qgis.core.backends.factory import BackendSpec, create_backend, infer_kind, resolve_spec  # noqa: E402
from geochat_qgis.core.backends.geopixel import GeoPixelBackend, GeoPixelSettings, _check_memory  # noqa: E402
from geochat_qgis.core.errors import BackendError  # noqa: E402
from geochat_qgis.core.families import get_family  # noqa: E402
from geochat_qgis.core.models.geopixel import layout, modeling  # noqa: E402
from geochat_qgis.core.models.geopixel.tiny import preset_configs  # noqa: E402
from geochat_qgis.core.pipeline import Job, run_job  # noqa: E402
from geochat_qgis.core.weights.machine import memory_available  # noqa: E402
from geopixel_fixtures import real_tile, tiny_geopixel_demo  # noqa: E402,F401 (fixture)


class SeenTiles(GeoPixelBackend):
    """The real backend, keeping the shapes of the tiles it was given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shapes: list[tuple[int, ...]] = []

    def generate(self, images, conversation, options):
        self.shapes += [np.shape(image) for image in images]
        return super().generate(images, conversation, options)


@pytest.fixture(scope="module")
def backend(tiny_geopixel_demo: Path) -> GeoPixelBackend:
    backend = SeenTiles(tiny_geopixel_demo, settings=GeoPixelSettings(device="cpu", dtype="float32"))
    backend.load()
    return backend


def test_a_tile_becomes_text_and_masks_at_its_own_size(backend: GeoPixelBackend) -> None:
    tiles = [real_tile(333, 600, 200, 300), real_tile(512, 512)]
    pieces: list[tuple[int, str]] = []
    options = GenerateOptions(max_new_tokens=16, on_token=lambda i, text: pieces.append((i, text)))
    out = backend.generate(tiles, Conversation.single("Could you segment a?", "geopixel"), options)
    family = get_family("geopixel")
    for index, (tile, generation) in enumerate(zip(tiles, out)):
        assert generation.text == "<p> a </p> [SEG]"
        assert "".join(text for i, text in pieces if i == index) == generation.text
        assert generation.masks.shape == (1, *tile.shape[:2])
        assert generation.prompt_tokens > 1200 and generation.generated_tokens == 5
        answer = family.parse(generation.text, (tile.shape[1], tile.shape[0]), generation.masks)
        assert [d.label for d in answer.detections] == ["a"] and answer.detections[0].kind == "mask"
        x1, y1, x2, y2 = answer.detections[0].bbox
        assert 0 <= x1 < x2 <= tile.shape[1] and 0 <= y1 < y2 <= tile.shape[0]


def test_a_chat_history_goes_into_the_prompt(backend: GeoPixelBackend) -> None:
    tile = real_tile(300, 300)
    first = backend.generate([tile], Conversation.single("Segment a.", "geopixel"), GenerateOptions(16))[0]
    turns = [Turn("What is here?", "Trees and a road."), Turn("Segment a.")]
    second = backend.generate([tile], Conversation(turns, "geopixel"), GenerateOptions(16))[0]
    assert second.prompt_tokens > first.prompt_tokens + 8


def test_the_pipeline_hands_a_cut_tile_unpadded_and_maps_its_masks(backend: SeenTiles, data_dir: Path) -> None:
    """world.rgb.tif is 512 x 256 px: its one 1680 px tile holds 512 x 256 raster pixels, which
    reach GeoPixel as they are (GeoPixel pads them itself), not as a padded 1680 px square."""
    import rasterio

    backend.shapes.clear()
    raster = data_dir / "world.rgb.tif"
    job = Job(raster=str(raster), task="segment", prompts=["a"], family="geopixel", max_new_tokens=12)
    result = run_job(job, backend)
    assert result.complete and not result.failures, result.failures
    assert backend.shapes == [(256, 512, 3)]
    assert result.detections and all(d.kind == "mask" for d in result.detections)
    with rasterio.open(raster) as ds:
        left, bottom, right, top = ds.bounds
    for detection in result.detections:
        x1, y1, x2, y2 = detection.geometry.bounds
        assert detection.geometry.is_valid and left - 1e-6 <= x1 < x2 <= right + 1e-6
        assert bottom - 1e-6 <= y1 < y2 <= top + 1e-6


def test_tiles_over_1680_px_and_sampling_are_refused(backend: GeoPixelBackend) -> None:
    conversation = Conversation.single("Segment a.", "geopixel")
    big = np.zeros((1681, 400, 3), np.uint8)
    with pytest.raises(BackendError, match="at most 1680 px a side.*Choose a tile size of 1680 px or less"):
        backend.generate([big], conversation, GenerateOptions())
    with pytest.raises(BackendError, match="greedily.*temperature to 0"):
        backend.generate([real_tile(64, 64)], conversation, GenerateOptions(temperature=0.7))


def test_settings_are_checked(tmp_path: Path) -> None:
    for bad, message in (({"device": "gpu"}, "device 'gpu' is not one of"), ({"dtype": "fp16"}, "dtype 'fp16'"),
                         ({"batch_size": 0}, "batch_size must be a whole number"),
                         ({"hd_num": "9"}, "hd_num must be a whole number")):
        with pytest.raises(BackendError, match=message):
            GeoPixelSettings(**bad)
    assert GeoPixelSettings(device="cuda:1").device == "cuda:1"
    with pytest.raises(BackendError, match="Unknown setting.*source.*Known: batch_size, device, dtype, hd_num"):
        create_backend(BackendSpec("geopixel", str(tmp_path), "geopixel", None, {"source": "/x"}))


def test_a_geopixel_folder_picks_the_geopixel_backend(tiny_geopixel_demo: Path) -> None:
    assert infer_kind(str(tiny_geopixel_demo)) == "geopixel"
    spec = resolve_spec(str(tiny_geopixel_demo))
    assert (spec.kind, spec.family) == ("geopixel", "geopixel")


def test_too_little_memory_is_said_before_loading() -> None:
    """GeoPixel-7B in float32 (about 36 GB of weights) on this machine's RAM."""
    text, vision, sam2 = preset_configs("real-width", 0)
    shapes = layout.checkpoint_layout(text, vision, sam2)
    config = modeling.GeoPixelConfig(text, vision, sam2)
    checkpoint = modeling.Checkpoint(Path("."), [], shapes, config)
    needed = modeling.weights_bytes(shapes, "float32")
    assert 33e9 < needed < 37e9  # 8.9 B parameters are used; the 2.4 B dead ones are not counted
    free = memory_available()
    if free is None or free > needed + 4e9:
        pytest.skip("this machine has the memory for GeoPixel-7B in float32")
    with pytest.raises(BackendError, match=r"needs about .* GiB of memory .* in float32 .* Use dtype bfloat16"):
        _check_memory(modeling, checkpoint, "cpu", "float32", 1, False)
