"""The CLIP vision tower and LLaVA MLP projector of an mmproj GGUF, read with ``gguf``.

Tensors follow llama.cpp's names (``v.patch_embd.weight``, ``v.blk.N.attn_q.weight``, ``mm.0``,
``mm.2``...). The table in ``v.position_embd.weight`` is used as stored: the project's converter
writes GeoChat's interpolated 1297-row table for 504 px. Matrices are kept as float32 ``(in, out)``
arrays, ready for ``x @ w``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import ModelError

#: projector types the project's own encoder computes (llama.cpp's LLaVA MLP)
OWN_PROJECTORS = ("mlp",)


@dataclass
class ClipLayer:
    ln1: tuple[np.ndarray, np.ndarray]
    qkv: tuple[np.ndarray, np.ndarray]  # (d, 3d) weight, (3d,) bias: q, k, v side by side
    out: tuple[np.ndarray, np.ndarray]
    ln2: tuple[np.ndarray, np.ndarray]
    up: tuple[np.ndarray, np.ndarray]
    down: tuple[np.ndarray, np.ndarray]


@dataclass
class ClipVision:
    """Everything the encoder needs: dimensions, preprocessing constants and weights."""

    path: Path
    projector_type: str
    image_size: int
    patch_size: int
    hidden: int
    heads: int
    eps: float
    quick_gelu: bool  # CLIP's activation; the projector's GELU is always the exact (erf) one
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_embd: np.ndarray  # (d,)
    patch: np.ndarray  # (3 * p * p, d), rows ordered (channel, y, x) as the conv kernel
    position: np.ndarray  # (n_patches + 1, d), CLS row first
    pre_ln: tuple[np.ndarray, np.ndarray]
    layers: list[ClipLayer]
    mm0: tuple[np.ndarray, np.ndarray]
    mm2: tuple[np.ndarray, np.ndarray]

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        """Image embeddings per image (patches only: CLS is dropped)."""
        return self.grid * self.grid

    @property
    def out_dim(self) -> int:
        return int(self.mm2[0].shape[1])


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _array(tensor) -> np.ndarray:
    import gguf

    kind = tensor.tensor_type
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        data = np.asarray(tensor.data)
    else:
        data = gguf.quants.dequantize(tensor.data, kind)
    return np.ascontiguousarray(data.astype(np.float32).reshape(tuple(int(n) for n in
                                                                       reversed(tensor.shape))))


def projector_type(path: str | Path) -> str:
    """``clip.projector_type`` of an mmproj GGUF (reads the header only)."""
    import gguf

    return str(_field(gguf.GGUFReader(str(path)), "clip.projector_type", "mlp"))


def read_mmproj(path: str | Path) -> ClipVision:
    """The vision tower and projector of ``path``; ModelError when the encoder cannot run it."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path.name} is not a readable mmproj GGUF ({exc}).") from exc
    kind = str(_field(reader, "clip.projector_type", "mlp"))
    if kind not in OWN_PROJECTORS:
        raise ModelError(f"{path.name}: projector type {kind!r} is not computed by the project's "
                         f"encoder (it computes {', '.join(OWN_PROJECTORS)}).")
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ModelError(f"{path.name} lacks tensor {name}: it is not a complete LLaVA mmproj; "
                             "convert the model again.")
        return _array(tensors[name])

    def linear(name: str) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(get(f"{name}.weight").T), get(f"{name}.bias")

    def norm(name: str) -> tuple[np.ndarray, np.ndarray]:
        return get(f"{name}.weight"), get(f"{name}.bias")

    blocks = int(_field(reader, "clip.vision.block_count"))
    feature = _field(reader, "clip.vision.feature_layer")
    # LLaVA reads layer -2: converters drop the last layer, so every block present runs (an
    # explicit feature_layer, as the project writes, names the last one to run).
    run = min(blocks, int(feature[-1])) if feature else blocks
    layers = []
    for i in range(run):
        q, k, v = (linear(f"v.blk.{i}.attn_{x}") for x in "qkv")
        layers.append(ClipLayer(
            norm(f"v.blk.{i}.ln1"),
            (np.ascontiguousarray(np.concatenate([q[0], k[0], v[0]], axis=1)),
             np.concatenate([q[1], k[1], v[1]])),
            linear(f"v.blk.{i}.attn_out"), norm(f"v.blk.{i}.ln2"),
            linear(f"v.blk.{i}.ffn_up"), linear(f"v.blk.{i}.ffn_down")))
    patch = get("v.patch_embd.weight")
    hidden = int(_field(reader, "clip.vision.embedding_length"))
    vision = ClipVision(
        path=path, projector_type=kind,
        image_size=int(_field(reader, "clip.vision.image_size")),
        patch_size=int(_field(reader, "clip.vision.patch_size")),
        hidden=hidden, heads=int(_field(reader, "clip.vision.attention.head_count")),
        eps=float(_field(reader, "clip.vision.attention.layer_norm_epsilon", 1e-5)),
        quick_gelu=not bool(_field(reader, "clip.use_gelu", False)),
        mean=tuple(float(x) for x in _field(reader, "clip.vision.image_mean")),
        std=tuple(float(x) for x in _field(reader, "clip.vision.image_std")),
        class_embd=get("v.class_embd"),
        patch=np.ascontiguousarray(patch.reshape(hidden, -1).T),
        position=get("v.position_embd.weight"),
        pre_ln=norm("v.pre_ln"), layers=layers,
        mm0=linear("mm.0"), mm2=linear("mm.2"),
    )
    if vision.position.shape[0] != vision.n_tokens + 1:
        raise ModelError(
            f"{path.name}: its position table has {vision.position.shape[0]} rows, "
            f"{vision.image_size} px at patch {vision.patch_size} needs {vision.n_tokens + 1}; "
            "convert the model again with the project's converter.")
    return vision


def text_embedding_size(path: Optional[str | Path]) -> Optional[int]:
    """``clip.vision.projection_dim`` of an mmproj (None when absent)."""
    import gguf

    value = _field(gguf.GGUFReader(str(path)), "clip.vision.projection_dim")
    return None if value is None else int(value)
