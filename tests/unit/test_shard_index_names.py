"""Shard names read from a checkpoint's ``*.index.json`` are outside input: the GeoChat loader
(checkpoint_io.weight_files, behind both conversions) refuses an index whose shard lies outside
the model's folder, names the index and the entry, and reads and writes nothing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from geochat_qgis.core.errors import ModelError
from geochat_qgis.core.weights.checkpoint_io import weight_files
from geochat_qgis.core.weights.convert_hf import convert_geochat_to_hf
from geochat_qgis.core.weights.gguf_writer import convert_geochat_to_gguf
from geochat_qgis.core.weights.tiny import build_tiny_geochat

INDEX = "pytorch_model.bin.index.json"
SHARD_2 = "pytorch_model-00002-of-00002.bin"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A tiny GeoChat checkpoint in the published layout (two .bin shards and their index)."""
    return build_tiny_geochat(tmp_path / "ckpt", "geochat-checkpoint")


def _point_shard_2_at(folder: Path, name: str) -> str:
    """Rewrite the index so every tensor of shard 2 lives in ``name``; the first such tensor."""
    index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    moved = [tensor for tensor, shard in index["weight_map"].items() if shard == SHARD_2]
    index["weight_map"].update(dict.fromkeys(moved, name))
    (folder / INDEX).write_text(json.dumps(index), encoding="utf-8")
    return moved[0]


def _move_shard_2_outside(folder: Path) -> Path:
    """Shard 2, a valid shard, moved out of the model's folder (an old loader would read it)."""
    outside = folder.parent / "outside.bin"
    (folder / SHARD_2).rename(outside)
    return outside


def _refused(folder: Path, out: Path, *fragments: str) -> None:
    with pytest.raises(ModelError) as caught:
        weight_files(folder)
    assert all(fragment in str(caught.value) for fragment in fragments), str(caught.value)
    for convert in (convert_geochat_to_hf, convert_geochat_to_gguf):
        with pytest.raises(ModelError, match="outside|unsafe|missing"):
            convert(folder, out)
        assert not out.exists(), "nothing may be written"


def test_the_published_index_still_loads(ckpt: Path) -> None:
    assert [p.name for p in weight_files(ckpt)] == ["pytorch_model-00001-of-00002.bin", SHARD_2]


def test_an_index_naming_etc_passwd_is_refused(ckpt: Path, tmp_path: Path) -> None:
    tensor = _point_shard_2_at(ckpt, "../../etc/passwd")
    _refused(ckpt, tmp_path / "out", str(ckpt / INDEX), "'../../etc/passwd'", f"'{tensor}'",
             "'..' part")


def test_an_index_naming_a_valid_shard_up_the_tree_is_refused(ckpt: Path, tmp_path: Path) -> None:
    _move_shard_2_outside(ckpt)
    tensor = _point_shard_2_at(ckpt, "../outside.bin")
    _refused(ckpt, tmp_path / "out", INDEX, "'../outside.bin'", f"'{tensor}'", "unsafe")


def test_an_index_naming_an_absolute_path_is_refused(ckpt: Path, tmp_path: Path) -> None:
    outside = _move_shard_2_outside(ckpt)
    tensor = _point_shard_2_at(ckpt, str(outside))
    _refused(ckpt, tmp_path / "out", INDEX, f"'{outside}'", f"'{tensor}'", "absolute path")


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
def test_an_index_naming_a_shard_behind_a_link_out_is_refused(ckpt: Path, tmp_path: Path) -> None:
    _move_shard_2_outside(ckpt)
    (ckpt / "sub").symlink_to(tmp_path, target_is_directory=True)
    tensor = _point_shard_2_at(ckpt, "sub/outside.bin")
    _refused(ckpt, tmp_path / "out", INDEX, "'sub/outside.bin'", f"'{tensor}'",
             "outside the model's folder")


def test_an_index_naming_a_missing_shard_is_refused(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / SHARD_2).unlink()
    _refused(ckpt, tmp_path / "out", f"{SHARD_2} named in {INDEX} is missing")


@pytest.mark.parametrize("weight_map", [["a.bin"], {"model.norm.weight": 3}, {"x": ["a.bin"]}])
def test_an_index_of_the_wrong_shape_is_refused(ckpt: Path, weight_map: object) -> None:
    (ckpt / INDEX).write_text(json.dumps({"weight_map": weight_map}), encoding="utf-8")
    with pytest.raises(ModelError, match=f"{INDEX} (is not a valid shard index|names the shard)"):
        weight_files(ckpt)
