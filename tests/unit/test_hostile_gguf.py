"""GGUFs that pass the file checks but would crash llama.cpp, written with the gguf package from
the project's tiny GeoChat: each is refused with the file and the fault named, before llama.cpp
sees it (in process and in the runtime child, which keeps running). A child that does die in
native code is reported with the model and what it was doing."""
from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from test_robust_vision_mmproj import V, gguf, rewrite

from geochat_qgis.core.backends.base import Conversation, GenerateOptions
from geochat_qgis.core.backends.factory import BackendSpec
from geochat_qgis.core.backends.gguf_files import read_gguf_info, resolve_gguf_pair
from geochat_qgis.core.errors import BackendError, ModelError
from geochat_qgis.core.runtime.backend import RuntimeSettings, SubprocessBackend

pytest.importorskip("llama_cpp")
SETTINGS = RuntimeSettings(python=sys.executable, heartbeat_interval=0.2, heartbeat_timeout=20.0,
                           startup_timeout=60.0, cancel_grace=5.0)


def _array(path: Path, name: str) -> np.ndarray:
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return np.array(tensor.data).reshape(tuple(int(n) for n in reversed(tensor.shape)))


def _faults(model: Path) -> dict[str, tuple[dict, str]]:
    """name -> (rewrite arguments, what the message must say), on the tiny text model (64 wide,
    2 blocks, 128 feed-forward, 4 heads, 514 tokens)."""
    query = _array(model, "blk.0.attn_q.weight")
    return {
        "block_count_1000": (dict(kv={"llama.block_count": (1000, V.UINT32, None)}),
                             r"llama.block_count = 1000 but the file holds blocks 0-1 \(2 in"),
        "block_count_3": (dict(kv={"llama.block_count": (3, V.UINT32, None)}),
                          "block_count = 3 but"),
        "block_count_1": (dict(kv={"llama.block_count": (1, V.UINT32, None)}),
                          "block_count = 1 but"),
        "block_count_0": (dict(kv={"llama.block_count": (0, V.UINT32, None)}),
                          "block_count is 0, not a positive"),
        "query_as_i32": (dict(tensors={"blk.0.attn_q.weight": query.view(np.int32)}),
                         "blk.0.attn_q.weight is stored as I32"),
        "norm_as_f64": (dict(tensors={"output_norm.weight": np.ones(64, np.float64)}),
                        "output_norm.weight is stored as F64"),
        "block_tensor_missing": (dict(drop=["blk.1.ffn_down.weight"]),
                                 "blk.1.ffn_down.weight is missing"),
        "embedding_length": (dict(kv={"llama.embedding_length": (128, V.UINT32, None)}),
                             "embedding_length is 128 but token_embd.weight has 64"),
        "feed_forward_length": (dict(kv={"llama.feed_forward_length": (100, V.UINT32, None)}),
                                r"blk.0.ffn_up.weight has shape \[64, 128\] but .* \[64, 100\]"),
        "head_count": (dict(kv={"llama.attention.head_count": (3, V.UINT32, None)}),
                       "head_count 3 does not divide the embedding size 64"),
        "key_width": (dict(tensors={"blk.1.attn_k.weight": np.zeros((32, 64), np.float32)}),
                      r"blk.1.attn_k.weight has shape \[64, 32\]"),
        "token_embd_missing": (dict(drop=["token_embd.weight"]), "token_embd.weight is missing"),
    }


@pytest.fixture(scope="module")
def broken(tiny_gguf, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (a model folder holding the broken text GGUF and the good mmproj, expected)."""
    root = tmp_path_factory.mktemp("broken")
    folders = {}
    for name, (changes, expected) in _faults(tiny_gguf / "model.gguf").items():
        folder = root / name
        folder.mkdir()
        shutil.copy(tiny_gguf / "mmproj.gguf", folder / "mmproj.gguf")
        rewrite(tiny_gguf / "model.gguf", folder / "model.gguf", **changes)
        folders[name] = (folder, expected)
    return folders


def test_every_broken_header_is_refused_naming_the_file_and_the_fault(broken, tiny_gguf):
    assert read_gguf_info(tiny_gguf / "model.gguf").architecture == "llama"  # the good passes
    for name, (folder, expected) in broken.items():
        with pytest.raises(ModelError, match=expected) as refused:
            resolve_gguf_pair(folder, None)
        assert str(folder / "model.gguf") in str(refused.value), name
        assert "download or convert it again" in str(refused.value)


def test_a_vision_tower_short_of_its_block_count_is_refused(tiny_gguf, tmp_path):
    mmproj = rewrite(tiny_gguf / "mmproj.gguf", tmp_path / "mmproj.gguf",
                     kv={"clip.vision.block_count": (40, V.UINT32, None)})
    with pytest.raises(ModelError, match="clip.vision.block_count = 40 but the file holds"):
        read_gguf_info(mmproj)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["block_count_1000", "query_as_i32"])
def test_the_runtime_child_refuses_what_crashed_llama_cpp(broken, name, monkeypatch, tmp_path):
    """Before: SIGABRT (block count 1000) and SIGSEGV (I32 weight) in llama.cpp."""
    monkeypatch.setenv("GEOCHAT_DEPS_DIR", str(tmp_path / "data"))
    folder, expected = broken[name]
    runtime = SubprocessBackend(BackendSpec("llama.cpp", str(folder), "geochat"), SETTINGS)
    try:
        with pytest.raises(ModelError, match=expected):
            runtime.load()
            runtime.generate([np.zeros((64, 64, 3), np.uint8)], Conversation.single("car?"),
                             GenerateOptions(max_new_tokens=4))
        assert runtime.process.alive  # refused by the child, not died in it
    finally:
        runtime.close()


@pytest.mark.slow
def test_a_native_crash_names_the_model_and_what_the_child_was_doing(tiny_gguf, monkeypatch,
                                                                     tmp_path):
    monkeypatch.setenv("GEOCHAT_DEPS_DIR", str(tmp_path / "data"))
    runtime = SubprocessBackend(BackendSpec("llama.cpp", str(tiny_gguf), "geochat"), SETTINGS)
    try:
        runtime.load()
        pid = runtime.pid

        def abort_child(index: int, text: str) -> None:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGABRT)  # what a failed GGML_ASSERT does

        with pytest.raises(BackendError) as died:
            runtime.generate([np.zeros((64, 64, 3), np.uint8)], Conversation.single("car?"),
                             GenerateOptions(max_new_tokens=40, on_token=abort_child))
        message = str(died.value)
        assert f"crashed (SIGABRT) in native code (llama.cpp, torch or a GPU driver). It was " \
               f"generating with {tiny_gguf}." in message
    finally:
        runtime.close()
