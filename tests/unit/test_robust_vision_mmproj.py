"""Hostile mmproj files for the project's GeoChat image encoder (core/vision/mmproj.py).

Each file is the project's tiny LLaVA mmproj rewritten with one fault (a tensor dropped, reshaped
or poisoned, a header value missing or wrong). Each must give a ModelError that names the file
and what to do, never a numpy error, a wrong answer or a crash.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from geochat_qgis.core.errors import BackendError, ModelError
from geochat_qgis.core.vision.encoder import ImageEncoder
from geochat_qgis.core.vision.mmproj import read_mmproj
from geochat_qgis.core.vision import tiny_gguf as tiny_writer
from geochat_qgis.core.vision.tiny_gguf import ClipDims, LlamaDims, write_llama_gguf, write_mlp_mmproj

gguf = pytest.importorskip("gguf")
V = gguf.GGUFValueType


def _read(path: Path):
    reader = gguf.GGUFReader(str(path))
    fields = []
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == V.ARRAY else None
        fields.append((name, field.contents(), field.types[0], sub))
    tensors = {t.name: np.array(t.data).reshape(tuple(int(n) for n in reversed(t.shape)))
               for t in reader.tensors}
    return reader.fields["general.architecture"].contents(), fields, tensors


def rewrite(source: Path, target: Path, drop=(), tensors=None, kv=None, drop_kv=()) -> Path:
    """``source`` (f32/f16 tensors) written again with tensors dropped or replaced and header
    values dropped or replaced (``kv``: name -> (value, type, array item type))."""
    architecture, fields, arrays = _read(source)
    for name in drop:
        arrays.pop(name)
    arrays.update(tensors or {})
    fields = [f for f in fields if f[0] not in drop_kv and f[0] not in (kv or {})]
    fields += [(name, *value) for name, value in (kv or {}).items()]
    writer = gguf.GGUFWriter(str(target), architecture)
    for field in fields:
        writer.add_key_value(*field)
    for name, array in arrays.items():
        writer.add_tensor(name, array)
    tiny_writer._finish(writer)
    return target


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_mlp_mmproj(tmp_path_factory.mktemp("mm") / "good.gguf", 64, ClipDims(), seed=1)


def _zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


# ClipDims(): 56 px, patch 14 (16 patches + CLS), width 16, 2 heads, MLP 32, 2 blocks, mm 16
FAULTS = {
    "position_cols": (dict(tensors={"v.position_embd.weight": _zeros(17, 8)}),
                      r"v.position_embd.weight has shape \(17, 8\).*needs \(17, 16\)"),
    "position_rows": (dict(tensors={"v.position_embd.weight": _zeros(10, 16)}),
                      "position table has 10 rows.*needs 17"),
    "patch_kernel": (dict(tensors={"v.patch_embd.weight": _zeros(16, 3, 7, 7)}),
                     "v.patch_embd.weight has shape"),
    "query_shape": (dict(tensors={"v.blk.0.attn_q.weight": _zeros(8, 16)}),
                    "v.blk.0.attn_q.weight has shape"),
    "bias_shape": (dict(tensors={"v.blk.1.ffn_up.bias": _zeros(5)}), "v.blk.1.ffn_up.bias"),
    "projector_in": (dict(tensors={"mm.0.weight": _zeros(16, 20)}), "mm.0.weight has shape"),
    "projector_width": (dict(tensors={"mm.2.weight": _zeros(128, 16), "mm.2.bias": _zeros(128)}),
                        "projection_dim is 64 but mm.2 projects to 128"),
    "nan_weight": (dict(tensors={"v.blk.0.attn_q.weight": np.full((16, 16), np.nan, np.float32)}),
                   "v.blk.0.attn_q.weight holds NaN or infinite"),
    "inf_position": (dict(tensors={"v.position_embd.weight": np.full((17, 16), np.inf,
                                                                     np.float32)}),
                     "holds NaN or infinite"),
    "no_block_count": (dict(drop_kv=["clip.vision.block_count"]), "lacks clip.vision.block_count"),
    "no_image_size": (dict(drop_kv=["clip.vision.image_size"]), "lacks clip.vision.image_size"),
    "no_mean": (dict(drop_kv=["clip.vision.image_mean"]), "lacks clip.vision.image_mean"),
    "mean_of_two": (dict(kv={"clip.vision.image_mean": ([0.5, 0.5], V.ARRAY, V.FLOAT32)}),
                    "image_mean is .* not 3 finite numbers"),
    "std_zero": (dict(kv={"clip.vision.image_std": ([0.0, 0.0, 0.0], V.ARRAY, V.FLOAT32)}),
                 "image_std .* not positive"),
    "heads_three": (dict(kv={"clip.vision.attention.head_count": (3, V.UINT32, None)}),
                    "width 16 does not split into 3 attention heads"),
    "heads_zero": (dict(kv={"clip.vision.attention.head_count": (0, V.UINT32, None)}),
                   "head_count is 0, not a positive whole number"),
    "patch_zero": (dict(kv={"clip.vision.patch_size": (0, V.UINT32, None)}),
                   "patch_size is 0"),
    "size_not_patches": (dict(kv={"clip.vision.image_size": (60, V.UINT32, None)}),
                         "image size 60 is not a multiple of patch size 14"),
    "size_as_text": (dict(kv={"clip.vision.image_size": ("504", V.STRING, None)}),
                     "image_size is '504'"),
    "feature_negative": (dict(kv={"clip.vision.feature_layer": ([-2], V.ARRAY, V.INT32)}),
                         "feature_layer"),
    "feature_layers_two": (dict(kv={"clip.vision.feature_layer": ([1, 2], V.ARRAY, V.INT32)}),
                           "LLaVA-NeXT"),
    "epsilon_negative": (dict(kv={"clip.vision.attention.layer_norm_epsilon":
                                  (-1.0, V.FLOAT32, None)}), "layer_norm_epsilon is -1.0"),
    "silu": (dict(kv={"clip.use_silu": (True, V.BOOL, None)}), "SiLU"),
    "projector_ldp": (dict(kv={"clip.projector_type": ("ldp", V.STRING, None)}),
                      "projector type 'ldp'"),
    # newer converters name the vision projector here (it was read as mlp)
    "vision_projector_key": (dict(drop_kv=["clip.projector_type"],
                                  kv={"clip.vision.projector_type": ("ldp", V.STRING, None)}),
                             "projector type 'ldp'"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_faulty_mmproj_is_a_model_error_naming_the_file(good, tmp_path, fault):
    edits, message = FAULTS[fault]
    path = rewrite(good, tmp_path / f"mmproj-{fault}.gguf", **edits)
    with pytest.raises(ModelError, match=message) as caught:
        ImageEncoder(path, device="cpu")
    assert f"mmproj-{fault}.gguf" in str(caught.value)


@pytest.mark.parametrize("keep", [0, 3, 10, 100, 0.5, 0.99])
def test_truncated_mmproj(good, tmp_path, keep):
    data = good.read_bytes()
    path = tmp_path / "mmproj-cut.gguf"
    path.write_bytes(data[: int(keep if keep >= 1 or keep == 0 else len(data) * keep)])
    with pytest.raises(ModelError, match="mmproj-cut.gguf.*(truncated|damaged|not a GGUF)"):
        read_mmproj(path)


def test_not_a_projector(tmp_path):
    text = write_llama_gguf(tmp_path / "text.gguf", LlamaDims())
    with pytest.raises(ModelError, match="text.gguf is not a vision projector.*'llama'"):
        read_mmproj(text)
    (tmp_path / "junk.gguf").write_bytes(b"not a model" * 50)
    with pytest.raises(ModelError, match="junk.gguf is not a GGUF file"):
        read_mmproj(tmp_path / "junk.gguf")
    with pytest.raises(ModelError, match="not found"):
        read_mmproj(tmp_path / "absent.gguf")


def test_weights_that_overflow_are_a_model_error(good, tmp_path):
    """Finite weights, but the projector's products overflow float32 on a tile."""
    path = rewrite(good, tmp_path / "mmproj-huge.gguf",
                   tensors={"mm.2.weight": np.full((64, 16), 3e38, np.float32)})
    encoder = ImageEncoder(path, device="cpu")
    with pytest.raises(ModelError, match="mmproj-huge.gguf.*non-finite"):
        encoder.embed(np.full((56, 56, 3), 200, np.uint8))
    assert encoder.encoded == 0  # nothing cached


def test_faulty_mmproj_through_the_llama_backend(tiny_gguf, tmp_path):
    """The backend's load says which projector is wrong (no TypeError from a missing key)."""
    pytest.importorskip("llama_cpp")
    from geochat_qgis.core.backends.llama_cpp import LlamaCppBackend, LlamaCppSettings

    shutil.copy(tiny_gguf / "model.gguf", tmp_path / "model.gguf")
    rewrite(tiny_gguf / "mmproj.gguf", tmp_path / "mmproj.gguf",
            drop_kv=["clip.vision.block_count"])
    backend = LlamaCppBackend(tmp_path, settings=LlamaCppSettings(vision="project", n_threads=2))
    with pytest.raises(ModelError, match="mmproj.gguf lacks clip.vision.block_count"):
        backend.load()


def test_empty_tile_is_refused(good):
    encoder = ImageEncoder(good, device="cpu")
    for shape in ((0, 5, 3), (0, 0, 3)):
        with pytest.raises(BackendError, match="tile is empty"):
            encoder.embed(np.zeros(shape, np.uint8))
