"""Shard names read from a GeoPixel folder's index (the published ``pytorch_model.bin.index.json``
or the converted ``model.safetensors.index.json``) are outside input: read_checkpoint and the
conversion refuse a shard outside the model's folder, naming the index and the entry."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from geochat_qgis.core.errors import ModelError
from geochat_qgis.core.models.geopixel import weights
from geochat_qgis.core.models.geopixel.modeling import read_checkpoint
from geopixel_fixtures import tiny_geopixel  # noqa: F401 (fixture)

SHARD_3 = "pytorch_model-00003-of-00003.bin"


@pytest.fixture
def folder(tiny_geopixel: Path, tmp_path: Path) -> Path:  # noqa: F811 (the fixture above)
    return Path(shutil.copytree(tiny_geopixel, tmp_path / "model"))


def _point_shard_3_at(folder: Path, name: str, index_name: str = weights.BIN_INDEX) -> str:
    """Write ``index_name`` from the published index, shard 3's tensors in ``name``; returns the
    first of them."""
    index = json.loads((folder / weights.BIN_INDEX).read_text(encoding="utf-8"))
    moved = [tensor for tensor, shard in index["weight_map"].items() if shard == SHARD_3]
    index["weight_map"].update(dict.fromkeys(moved, name))
    (folder / index_name).write_text(json.dumps(index), encoding="utf-8")
    return moved[0]


def _refused(folder: Path, out: Path, *fragments: str, convert: bool = True) -> None:
    with pytest.raises(ModelError) as caught:
        read_checkpoint(folder)
    assert all(fragment in str(caught.value) for fragment in fragments), str(caught.value)
    if convert:
        with pytest.raises(ModelError) as caught:
            weights.convert_to_safetensors(folder, out)
        assert all(fragment in str(caught.value) for fragment in fragments), str(caught.value)
        assert not out.exists(), "nothing may be written"


@pytest.mark.parametrize("index_name", [weights.BIN_INDEX, weights.SAFETENSORS_INDEX])
def test_an_index_naming_etc_passwd_is_refused(folder: Path, tmp_path: Path, index_name: str) -> None:
    tensor = _point_shard_3_at(folder, "../../etc/passwd", index_name)
    _refused(folder, tmp_path / "out", str(folder / index_name), "'../../etc/passwd'", f"'{tensor}'",
             "'..' part", convert=index_name == weights.BIN_INDEX)


def test_an_index_naming_an_absolute_path_to_a_valid_shard_is_refused(folder: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    (folder / SHARD_3).rename(outside)  # a valid shard: a loader without the check would read it
    tensor = _point_shard_3_at(folder, str(outside))
    _refused(folder, tmp_path / "out", weights.BIN_INDEX, f"'{outside}'", f"'{tensor}'", "absolute path")


def test_an_index_naming_a_missing_shard_is_refused(folder: Path, tmp_path: Path) -> None:
    (folder / SHARD_3).unlink()
    _refused(folder, tmp_path / "out", f"{SHARD_3} named in {weights.BIN_INDEX} is missing")


def test_a_converted_index_naming_a_missing_shard_is_refused(folder: Path, tmp_path: Path) -> None:
    _point_shard_3_at(folder, "model-00003-of-00003.safetensors", weights.SAFETENSORS_INDEX)
    _refused(folder, tmp_path / "out", f"model-00003-of-00003.safetensors named in {weights.SAFETENSORS_INDEX} "
             "is missing", convert=False)
