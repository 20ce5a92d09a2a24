"""PyTorch checkpoints read and written with numpy alone (torch_zip, torch_pickle,
torch_zip_writer, tensor_data): what torch.save writes is read bit for bit as torch.load reads
it, what numpy writes torch reads, and anything but tensors and plain containers is refused."""
from __future__ import annotations

import collections
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


# ---------------------------------------------------------------- against torch itself
def _torch_state(torch):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    state = collections.OrderedDict()
    state["f32"] = base
    state["transposed"] = base.t()  # shares the storage, other strides
    state["window"] = base[2:, 1:5]  # an offset into it
    state["bf16"] = torch.randn(5, 3, generator=gen).to(torch.bfloat16)
    state["f16"] = torch.randn(4, 7, generator=gen).half()[:, ::2]
    state["f64"] = torch.randn(3, generator=gen, dtype=torch.float64)
    state["i64"] = torch.arange(10)
    state["i8"] = torch.arange(-4, 4, dtype=torch.int8)
    state["flags"] = torch.tensor([True, False])
    state["scalar"] = torch.tensor(3.25)
    state["empty"] = torch.zeros(0, 3)
    state["expanded"] = torch.randn(1, 4, generator=gen).expand(3, 4)
    state["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=gen))
    return state


def _as_numpy(torch, tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


@pytest.mark.needs_torch
def test_bit_identical_to_torch_load(tmp_path: Path) -> None:
    """Both of torch.save's formats: the zip one and the legacy (PyTorch < 1.6) one."""
    import torch

    for zip_format in (True, False):
        path = tmp_path / f"saved-{zip_format}.bin"
        torch.save(_torch_state(torch), path, _use_new_zipfile_serialization=zip_format)
        theirs = torch.load(path, weights_only=True)
        mine = read_torch_checkpoint(path)
        assert list(mine) == list(theirs)
        for name, tensor in theirs.items():
            assert mine[name].dtype == str(tensor.dtype).replace("torch.", ""), name
            expected = _as_numpy(torch, tensor)
            assert mine[name].shape == expected.shape, name
            assert mine[name].array.tobytes() == expected.tobytes(), (zip_format, name)


@pytest.mark.needs_torch
def test_torch_reads_what_numpy_writes(tmp_path: Path) -> None:
    import torch

    state = _state()
    path = save_state_dict(state, tmp_path / "numpy.bin")
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(state)
        for name, value in state.items():
            assert _as_numpy(torch, loaded[name]).tobytes() == np.ascontiguousarray(_values(value)).tobytes()
    assert loaded["bf16"].dtype == torch.bfloat16 and loaded["flags"].dtype == torch.bool


CASTS = [("float32", "bfloat16"), ("float64", "bfloat16"), ("float16", "bfloat16"),
         ("bfloat16", "float16"), ("bfloat16", "float32"), ("float32", "float16")]


@pytest.mark.needs_torch
def test_casts_give_torchs_bits() -> None:
    import torch

    gen = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randn(20000, generator=gen) * scale for scale in (1e-6, 1.0, 300.0, 7e4)])
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65520.0, 1e-8, 3.4e38])
    for source, target in CASTS:
        start = torch.cat([values, special]).to(getattr(torch, source))
        mine = TensorData(_as_numpy(torch, start), source).to(target)
        theirs = _as_numpy(torch, start.to(getattr(torch, target)))
        assert mine.array.tobytes() == theirs.tobytes(), (source, target)
        # a NaN stays a NaN (its bits differ between torch's own scalar and vector paths)
        nan = TensorData(_as_numpy(torch, torch.tensor([float("nan")]).to(getattr(torch, source))), source)
        assert np.isnan(nan.to(target).float32()).all()


# ---------------------------------------------------------------- conversions, either reader
@pytest.fixture(scope="module")
def mixed_checkpoint(tmp_path_factory) -> Path:
    """The tiny GeoChat with its first shard in bfloat16 and its second in float16."""
    from geochat_qgis.core.weights.checkpoint_io import open_tensors
    from geochat_qgis.core.weights.tiny import build_tiny_geochat

    ckpt = build_tiny_geochat(tmp_path_factory.mktemp("mixed") / "ckpt", "geochat-checkpoint")
    for shard, dtype in (("pytorch_model-00001-of-00002.bin", "bfloat16"),
                         ("pytorch_model-00002-of-00002.bin", "float16")):
        with open_tensors(ckpt / shard) as tensors:
            state = {name: t.to(dtype) for name, t in tensors.items()}
        save_state_dict(state, ckpt / shard)
    return ckpt


@pytest.mark.needs_torch
def test_either_reader_gives_the_same_output_bytes(mixed_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    """GGUF and HF outputs of a bf16 + f16 checkpoint, read with numpy and with torch.load."""
    from geochat_qgis.core.weights.checkpoint_io import READER_ENV
    from geochat_qgis.core.weights.convert_hf import convert_geochat_to_hf
    from geochat_qgis.core.weights.gguf_writer import convert_geochat_to_gguf

    for convert in (convert_geochat_to_gguf, convert_geochat_to_hf):
        outputs = {}
        for reader in ("numpy", "torch"):
            monkeypatch.setenv(READER_ENV, reader)
            out = convert(mixed_checkpoint, tmp_path / f"{convert.__name__}-{reader}")
            outputs[reader] = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                               if p.is_file()}
        assert outputs["numpy"].keys() == outputs["torch"].keys() and len(outputs["numpy"]) >= 2
        for name, data in outputs["numpy"].items():
            assert data == outputs["torch"][name], (convert.__name__, name)
