"""Reading GeoChat checkpoints safely: bad checkpoints are refused with a clear message and
nothing is written to the output folder."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from geochat_qgis.cli import main
from geochat_qgis.core.errors import ModelError
from geochat_qgis.core.weights.checkpoint_io import open_tensors
from geochat_qgis.core.weights.convert_hf import convert_geochat_to_hf
from geochat_qgis.core.weights.geochat_checkpoint import open_geochat_checkpoint
from geochat_qgis.core.weights.gguf_writer import convert_geochat_to_gguf
from geochat_qgis.core.weights.tiny import build_tiny_geochat, write_safetensors
from geochat_qgis.core.weights.torch_zip import LEGACY_MAGIC
from geochat_qgis.core.weights.torch_zip_writer import save_state_dict

SHARD_2 = "pytorch_model-00002-of-00002.bin"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return build_tiny_geochat(tmp_path_factory.mktemp("pristine") / "ckpt", "geochat-checkpoint")


@pytest.fixture
def ckpt(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def _read_shard(path: Path) -> dict[str, np.ndarray]:
    with open_tensors(path) as tensors:
        return {name: np.array(t.array) for name, t in tensors.items()}


def _edit_shard(path: Path, edit) -> None:
    state = _read_shard(path)
    edit(state)
    save_state_dict(state, path)


class _RunsCode:
    """A pickle payload that would create a folder if unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _refused(src: Path, out: Path, match: str, **kwargs) -> None:
    for convert in (convert_geochat_to_hf, convert_geochat_to_gguf):
        with pytest.raises(ModelError, match=match):
            convert(src, out, **kwargs)
        assert not out.exists(), "nothing may be written to OUT"
        assert not list(out.parent.glob(f".{out.name}.*")), "no staging folder left behind"


def test_valid_checkpoint_metadata(pristine: Path) -> None:
    ckpt = open_geochat_checkpoint(pristine)
    assert ckpt.num_layers == 2 and ckpt.checkpoint_vocab == 512 and ckpt.dtype == "float32"
    assert ckpt.added_tokens() == ["<im_patch>"]
    assert ckpt.clip.grid == 24 and ckpt.clip.num_layers == 3


def test_missing_tensor_is_refused(ckpt: Path, tmp_path: Path) -> None:
    _edit_shard(ckpt / SHARD_2, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    _refused(ckpt, tmp_path / "out", r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight")


def test_unexpected_tensor_is_refused(ckpt: Path, tmp_path: Path) -> None:
    _edit_shard(ckpt / SHARD_2, lambda s: s.update({"model.layers.7.mlp.up_proj.weight": np.zeros(2, np.float32)}))
    _refused(ckpt, tmp_path / "out", r"unexpected tensor.*model\.layers\.7")


def test_shape_that_contradicts_the_config_is_refused(ckpt: Path, tmp_path: Path) -> None:
    _edit_shard(ckpt / SHARD_2, lambda s: s.update({"model.mm_projector.0.weight": np.zeros((64, 16), np.float32)}))
    _refused(ckpt, tmp_path / "out", "do not belong together")


def test_tokenizer_smaller_than_the_embeddings_is_refused(ckpt: Path, tmp_path: Path) -> None:
    _edit_shard(ckpt / SHARD_2, lambda s: s.update({"lm_head.weight": np.zeros((612, 64), np.float32)}))
    _edit_shard(ckpt / "pytorch_model-00001-of-00002.bin", lambda s: s.update(
        {"model.embed_tokens.weight": np.zeros((612, 64), np.float32)}))
    _refused(ckpt, tmp_path / "out", "tokenizer files do not belong")


@pytest.mark.parametrize("shard", [SHARD_2, "clip/model.safetensors"])
def test_truncated_shard_is_refused(ckpt: Path, tmp_path: Path, shard: str) -> None:
    path = ckpt / shard
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(ckpt, tmp_path / "out", "truncated")


def test_missing_shard_named_by_the_index_is_refused(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / SHARD_2).unlink()
    _refused(ckpt, tmp_path / "out", r"incomplete.*pytorch_model-00002-of-00002\.bin")


def _pickle_with_code(marker: Path) -> bytes:
    return pickle.dumps({"model.norm.weight": _RunsCode(marker)}, protocol=2)


def _write_zip_pickle(path: Path, payload: bytes) -> None:
    """A zip laid out as torch.save writes it, its data.pkl ``payload``."""
    path.unlink()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")


def _write_legacy_pickle(path: Path, payload: bytes) -> None:
    """The legacy (PyTorch < 1.6) layout: magic, protocol, system info, then the payload."""
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}
    path.write_bytes(b"".join(pickle.dumps(v, protocol=2) for v in (LEGACY_MAGIC, 1001, info))
                     + payload + pickle.dumps([], protocol=2))


@pytest.mark.parametrize("writer", [_write_zip_pickle, _write_legacy_pickle])
def test_pickle_that_would_run_code_is_refused_not_run(ckpt: Path, tmp_path: Path, writer) -> None:
    marker = tmp_path / "code-ran"
    writer(ckpt / SHARD_2, _pickle_with_code(marker))
    _refused(ckpt, tmp_path / "out", r"would run code.*os\.makedirs")
    assert not marker.exists()


def test_not_a_geochat_checkpoint_is_refused(ckpt: Path, tmp_path: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "qwen2"
    (ckpt / "config.json").write_text(json.dumps(config))
    _refused(ckpt, tmp_path / "out", "not GeoChat")


def test_missing_clip_tower_names_the_fix_and_clip_option_works(ckpt: Path, tmp_path: Path) -> None:
    clip = Path(shutil.move(str(ckpt / "clip"), str(tmp_path / "clip-336")))
    _refused(ckpt, tmp_path / "out", "--clip")
    out = convert_geochat_to_hf(ckpt, tmp_path / "hf", clip=clip)
    assert (out / "config.json").is_file()


def test_non_empty_output_folder_is_refused(pristine: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty"):
        convert_geochat_to_gguf(pristine, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_safetensors_geochat_checkpoint_converts(ckpt: Path, tmp_path: Path) -> None:
    """Shards in safetensors go through the same path as pickles."""
    for index, shard in enumerate(sorted(ckpt.glob("pytorch_model-*.bin")), start=1):
        write_safetensors(ckpt / f"model-{index}.safetensors", _read_shard(shard))
        shard.unlink()
    (ckpt / "pytorch_model.bin.index.json").unlink()
    out = convert_geochat_to_gguf(ckpt, tmp_path / "gguf")
    assert sorted(p.name for p in out.iterdir()) == ["mmproj.gguf", "model.gguf"]


def test_cli_reports_refusal_and_exits_non_zero(ckpt: Path, tmp_path: Path, capsys) -> None:
    _edit_shard(ckpt / SHARD_2, lambda s: s.pop("lm_head.weight"))
    out = tmp_path / "out"
    assert main(["convert", "geochat", str(ckpt), str(out), "--to", "gguf", "--quant", "q8_0"]) == 1
    assert "lm_head.weight" in capsys.readouterr().err
    assert not out.exists()
