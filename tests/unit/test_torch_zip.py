"""PyTorch checkpoints read and written with numpy alone (torch_zip, torch_pickle,
torch_zip_writer, tensor_data): round trips, memory maps, torch's bf16 rounding, and anything but
tensors and plain containers refused. Against torch itself: test_torch_parity.py."""
from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from geochat_qgis.core.weights.tensor_data import TensorData, bf16_to_f32, f32_to_bf16
from geochat_qgis.core.weights.torch_pickle import RefusedPickle, unpickle
from geochat_qgis.core.weights.torch_zip import read_torch_checkpoint
from geochat_qgis.core.weights.torch_zip_writer import ALIGNMENT, save_state_dict, state_pickle


def _state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((6, 5), dtype=np.float32),
        "f16": rng.standard_normal((3, 7)).astype(np.float16),
        "bf16": TensorData(f32_to_bf16(rng.standard_normal((4, 3), dtype=np.float32)), "bfloat16"),
        "f64": rng.standard_normal(3),
        "i64": np.arange(12, dtype=np.int64).reshape(3, 4) - 5,
        "flags": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "strided": np.arange(40, dtype=np.float32).reshape(5, 8)[:, ::3],
    }


def _values(value) -> np.ndarray:
    return value.array if isinstance(value, TensorData) else np.asarray(value)


@pytest.mark.parametrize("force_zip64", [False, True])
def test_what_numpy_writes_numpy_reads_back(tmp_path: Path, force_zip64: bool) -> None:
    state = _state()
    path = save_state_dict(state, tmp_path / "shard.bin", force_zip64=force_zip64)
    back = read_torch_checkpoint(path)
    assert list(back) == list(state)
    for name, value in state.items():
        expected = _values(value)
        assert back[name].shape == expected.shape and np.array_equal(back[name].array, expected), name
    assert back["bf16"].dtype == "bfloat16" and back["f16"].dtype == "float16"
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every CRC right
        for info in archive.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            if "/data/" in info.filename:
                with path.open("rb") as handle:
                    handle.seek(info.header_offset + 26)
                    name_length, extra_length = struct.unpack("<HH", handle.read(4))
                assert (info.header_offset + 30 + name_length + extra_length) % ALIGNMENT == 0


def test_tensors_are_memory_maps_of_the_file(tmp_path: Path) -> None:
    path = save_state_dict({"w": np.ones((256, 256), np.float32)}, tmp_path / "w.bin")
    tensor = read_torch_checkpoint(path)["w"]
    assert isinstance(tensor.array.base, np.memmap) or isinstance(tensor.array, np.memmap)
    assert not tensor.array.flags.writeable


def test_bf16_rounds_as_torch_does() -> None:
    values = np.array([1.0, 1.0078125, -1.015625, -2.0 ** -130, 3.4e38, np.inf, -np.inf, np.nan,
                       1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8], dtype=np.float32)
    bits = f32_to_bf16(values)
    assert bits.dtype == np.uint16
    # ties go to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 -> 1; 1 + 3*2^-8 -> 1 + 2^-6
    assert bits[8] == 0x3F80 and bits[9] == 0x3F82 and bits[7] == 0x7FC0
    assert bits[6] == 0xFF80 and bits[5] == 0x7F80 and bits[4] == 0x7F80  # 3.4e38 rounds to inf
    assert np.array_equal(bf16_to_f32(f32_to_bf16(bf16_to_f32(bits[:7]))), bf16_to_f32(bits[:7]))
    half = TensorData(bits[:3], "bfloat16").to("float16")
    assert half.dtype == "float16" and half.array.tolist() == [1.0, 1.0078125, -1.015625]


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo ran",))


def _pickled(obj) -> io.BytesIO:
    return io.BytesIO(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("payload, named", [
    (_pickled({"w": _Boom()}), "system"),
    (io.BytesIO(b"\x80\x02cbuiltins\neval\n(X\x04\x00\x00\x001+1tR."), "builtins.eval"),
    (io.BytesIO(b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n)R."), "_rebuild_from_type_v2"),
    (io.BytesIO(b"\x80\x02ctorch.nn\nModule\n)\x81."), "torch.nn.Module"),
    # persistent id of a pickled module's source (old torch.save(model)): not a storage
    (io.BytesIO(b"\x80\x02(X\x06\x00\x00\x00moduleX\x01\x00\x00\x00mtQ."), "not a storage"),
    # BUILD on the storage type (setting its attributes) is refused, not applied
    (io.BytesIO(b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x02\x00\x00\x00ossb."), "state"),
])
def test_anything_but_tensors_and_containers_is_refused(payload: io.BytesIO, named: str) -> None:
    with pytest.raises(RefusedPickle, match=named):
        unpickle(payload)


def test_a_tensor_with_hooks_or_a_bad_storage_is_refused() -> None:
    rebuild = "ctorch._utils\n_rebuild_tensor_v2\n"
    storage = "(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
    hooks = "ccollections\nOrderedDict\n)R"
    good = f"\x80\x02{rebuild}({storage}K\x00(K\x04t(K\x01t\x89{hooks}tR."
    tensor, storages = unpickle(io.BytesIO(good.encode("latin-1")))
    assert tensor.size == (4,) and storages["0"].dtype == "float32"
    with_hooks = f"\x80\x02{rebuild}({storage}K\x00(K\x04t(K\x01t\x89}}K\x01K\x02stR."
    with pytest.raises(RefusedPickle, match="hooks"):
        unpickle(io.BytesIO(with_hooks.encode("latin-1")))
    not_a_storage = f"\x80\x02{rebuild}(K\x00K\x00(K\x04t(K\x01t\x89{hooks}tR."
    with pytest.raises(RefusedPickle, match="storage"):
        unpickle(io.BytesIO(not_a_storage.encode("latin-1")))


def _zip_with(tmp_path: Path, members: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> Path:
    path = tmp_path / "odd.bin"
    with zipfile.ZipFile(path, "w", compress) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_damaged_checkpoints_are_value_errors_naming_the_fault(tmp_path: Path) -> None:
    pkl = state_pickle([("w", "float32", (4,))])
    good = np.arange(4, dtype="<f4").tobytes()
    cases = {
        "missing from the zip": {"a/data.pkl": pkl},
        "holds 12 bytes": {"a/data.pkl": pkl, "a/data/0": good[:12]},
        "not a PyTorch checkpoint": {"a/weights.npy": good},
        "cut short or malformed": {"a/data.pkl": pkl[:-9], "a/data/0": good},
    }
    for fault, members in cases.items():
        with pytest.raises(ValueError, match=fault):
            read_torch_checkpoint(_zip_with(tmp_path, members))
    with pytest.raises(ValueError, match="compressed"):
        read_torch_checkpoint(_zip_with(tmp_path, {"a/data.pkl": pkl, "a/data/0": good}, zipfile.ZIP_DEFLATED))
    whole = save_state_dict({"w": np.ones(1000, np.float32)}, tmp_path / "whole.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="zip directory"):
        read_torch_checkpoint(tmp_path / "cut.bin")
    (tmp_path / "text.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="neither a zip nor a legacy"):
        read_torch_checkpoint(tmp_path / "text.bin")


def test_a_big_endian_checkpoint_reads_as_the_same_values(tmp_path: Path) -> None:
    values = np.linspace(-3, 3, 6, dtype=np.float32).reshape(2, 3)
    path = _zip_with(tmp_path, {"a/data.pkl": state_pickle([("w", "float32", (2, 3))]),
                                "a/byteorder": b"big", "a/data/0": values.astype(">f4").tobytes()})
    tensor = read_torch_checkpoint(path)["w"]
    assert np.array_equal(tensor.to("float32").array, values)
    assert tensor.to("float32").array.dtype == np.dtype("<f4") and bytes(tensor.raw()) == values.tobytes()
