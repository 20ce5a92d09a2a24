"""The numpy reader and writer against torch itself (torch by design: tests/conftest.py lists this
file). What torch.save writes, in both of its formats, is read bit for bit as torch.load reads it;
what numpy writes torch reads; the casts give torch's bits; a GeoChat conversion gives the same
bytes whichever reader reads the shards; a torch-saved pickle that would run code is refused."""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch

from geochat_qgis.core.weights.tensor_data import TensorData
from geochat_qgis.core.weights.torch_zip import read_torch_checkpoint
from geochat_qgis.core.weights.torch_zip_writer import save_state_dict
from test_torch_zip import _state, _values
from test_weights_checkpoint import SHARD_2, _refused, _RunsCode, ckpt, pristine  # noqa: F401 (fixtures)
from test_weights_helpers import original_arrays, original_tensors


def _torch_state():
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


def _as_numpy(tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def test_bit_identical_to_torch_load(tmp_path: Path) -> None:
    """Both of torch.save's formats: the zip one and the legacy (PyTorch < 1.6) one."""
    for zip_format in (True, False):
        path = tmp_path / f"saved-{zip_format}.bin"
        torch.save(_torch_state(), path, _use_new_zipfile_serialization=zip_format)
        theirs = torch.load(path, weights_only=True)
        mine = read_torch_checkpoint(path)
        assert list(mine) == list(theirs)
        for name, tensor in theirs.items():
            assert mine[name].dtype == str(tensor.dtype).replace("torch.", ""), name
            expected = _as_numpy(tensor)
            assert mine[name].shape == expected.shape, name
            assert mine[name].array.tobytes() == expected.tobytes(), (zip_format, name)


def test_torch_reads_what_numpy_writes(tmp_path: Path) -> None:
    state = _state()
    path = save_state_dict(state, tmp_path / "numpy.bin")
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(state)
        for name, value in state.items():
            assert _as_numpy(loaded[name]).tobytes() == np.ascontiguousarray(_values(value)).tobytes()
    assert loaded["bf16"].dtype == torch.bfloat16 and loaded["flags"].dtype == torch.bool


CASTS = [("float32", "bfloat16"), ("float64", "bfloat16"), ("float16", "bfloat16"),
         ("bfloat16", "float16"), ("bfloat16", "float32"), ("float32", "float16")]


def test_casts_give_torchs_bits() -> None:
    gen = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randn(20000, generator=gen) * scale for scale in (1e-6, 1.0, 300.0, 7e4)])
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65520.0, 1e-8, 3.4e38])
    for source, target in CASTS:
        start = torch.cat([values, special]).to(getattr(torch, source))
        mine = TensorData(_as_numpy(start), source).to(target)
        theirs = _as_numpy(start.to(getattr(torch, target)))
        assert mine.array.tobytes() == theirs.tobytes(), (source, target)
        # a NaN stays a NaN (its bits differ between torch's own scalar and vector paths)
        nan = TensorData(_as_numpy(torch.tensor([float("nan")]).to(getattr(torch, source))), source)
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


def test_torch_reads_the_checkpoint_numpy_wrote(pristine: Path) -> None:
    """The shards and CLIP are written without torch; torch (torch.load with weights_only,
    memory-mapped too, and safetensors) reads back exactly what the numpy reader reads."""
    mine = original_arrays(pristine)
    theirs = original_tensors(pristine)
    assert set(mine) == set(theirs)
    for name, tensor in theirs.items():
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        assert np.array_equal(tensor.numpy(), mine[name]), name
    for shard in sorted(pristine.glob("pytorch_model-*.bin")):
        mapped = torch.load(shard, weights_only=True, mmap=True)
        assert all(np.array_equal(t.numpy(), mine[k]) for k, t in mapped.items())


def test_torch_saved_pickle_that_would_run_code_is_refused(ckpt: Path, tmp_path: Path) -> None:
    """The same refusal for what torch.save itself writes, in both of its formats."""
    marker = tmp_path / "code-ran"
    state = torch.load(ckpt / SHARD_2, weights_only=True)
    state["model.norm.weight"] = _RunsCode(marker)
    for zip_format in (True, False):
        torch.save(state, ckpt / SHARD_2, _use_new_zipfile_serialization=zip_format)
        _refused(ckpt, tmp_path / "out", "would run code")
        assert not marker.exists()
