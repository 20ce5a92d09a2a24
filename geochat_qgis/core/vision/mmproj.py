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
from ..gguf_reader import open_gguf

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
    try:
        return field.contents()
    except Exception:  # a damaged value (the gguf package raises many kinds)
        return default


def _array(tensor) -> np.ndarray:
    import gguf

    kind = tensor.tensor_type
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        data = np.asarray(tensor.data)
    else:
        data = gguf.quants.dequantize(tensor.data, kind)
    return np.ascontiguousarray(data.astype(np.float32).reshape(tuple(int(n) for n in
                                                                       reversed(tensor.shape))))


def _kind(reader) -> str:
    """The vision projector type: ``clip.vision.projector_type`` (newer converters, mixed
    modality files) before ``clip.projector_type``; LLaVA's ``mlp`` when neither is there."""
    kind = _field(reader, "clip.vision.projector_type")
    return str(kind if kind is not None else _field(reader, "clip.projector_type", "mlp"))


def projector_type(path: str | Path) -> str:
    """The projector type of an mmproj GGUF (reads the header only)."""
    import gguf

    return _kind(gguf.GGUFReader(str(path)))


_AGAIN = "convert the model again with the project's converter"


class _File:
    """One mmproj's header values and tensors, each checked as it is read (ModelError)."""

    def __init__(self, path: Path) -> None:
        self.path, self.name = path, path.name
        self.reader = open_gguf(path)  # missing, not GGUF, damaged, truncated
        self.tensors = {t.name: t for t in self.reader.tensors}

    def fail(self, what: str) -> ModelError:
        return ModelError(f"{self.name}: {what}; the file is damaged or not a LLaVA mmproj: "
                          f"{_AGAIN}.")

    def field(self, key: str, default: Any = None) -> Any:
        value = _field(self.reader, key, default)
        if value is None:
            raise ModelError(f"{self.name} lacks {key}: it is not a complete LLaVA mmproj; "
                             f"{_AGAIN}.")
        return value

    def count(self, key: str, default: Any = None) -> int:
        """A positive whole number."""
        value = self.field(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise self.fail(f"{key} is {value!r}, not a positive whole number")
        return int(value)

    def numbers(self, key: str, size: int) -> tuple[float, ...]:
        value = self.field(key)
        try:
            values = tuple(float(x) for x in value)
        except (TypeError, ValueError):
            values = ()
        if len(values) != size or not all(np.isfinite(values)):
            raise self.fail(f"{key} is {value!r}, not {size} finite numbers")
        return values

    def flag(self, key: str) -> bool:
        value = self.field(key, False)
        if not isinstance(value, bool):
            raise self.fail(f"{key} is {value!r}, not true or false")
        return value

    def tensor(self, name: str, *shape: int) -> np.ndarray:
        """Tensor ``name`` as float32 of ``shape`` (numpy order), all of it finite."""
        if name not in self.tensors:
            raise ModelError(f"{self.name} lacks tensor {name}: it is not a complete LLaVA mmproj; "
                             "convert the model again.")
        tensor = self.tensors[name]
        try:
            array = _array(tensor)
        except (NotImplementedError, ValueError, TypeError) as exc:
            raise ModelError(f"{self.name}: tensor {name} ({tensor.tensor_type.name}) cannot be "
                             f"read ({exc}); convert the mmproj to f16 or f32.") from exc
        if array.shape != shape:
            raise self.fail(f"tensor {name} has shape {array.shape}, the tower its header "
                            f"describes needs {shape}")
        if not np.isfinite(array).all():
            raise ModelError(f"{self.name}: tensor {name} holds NaN or infinite values: the file "
                             "is damaged; download or convert the model again.")
        return array

    def rows(self, name: str, n_in: int, n_out: Optional[int] = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """A linear layer as ``(in, out)`` weight and bias; ``n_out`` None: as stored."""
        if n_out is None:
            stored = self.tensors.get(f"{name}.weight")
            n_out = int(stored.shape[-1]) if stored is not None and len(stored.shape) == 2 else 0
        weight = self.tensor(f"{name}.weight", n_out, n_in)
        return np.ascontiguousarray(weight.T), self.tensor(f"{name}.bias", n_out)


def read_mmproj(path: str | Path) -> ClipVision:
    """The vision tower and projector of ``path``; ModelError (naming the file, what is wrong
    and what to do) when the encoder cannot run it exactly."""
    path = Path(path)
    file = _File(path)
    architecture = _field(file.reader, "general.architecture", "unknown")
    if architecture != "clip":
        raise ModelError(f"{path.name} is not a vision projector (its architecture is "
                         f"{architecture!r}): pass the model's mmproj GGUF as the mmproj.")
    kind = _kind(file.reader)
    if kind not in OWN_PROJECTORS:
        raise ModelError(f"{path.name}: projector type {kind!r} is not computed by the project's "
                         f"encoder (it computes {', '.join(OWN_PROJECTORS)}).")
    if file.flag("clip.use_silu") or _field(file.reader, "clip.vision.image_grid_pinpoints"):
        raise ModelError(f"{path.name} is not a LLaVA-1.5 style mmproj (SiLU or LLaVA-NeXT "
                         "tiling): the project's encoder computes GeoChat's tower; use GeoChat's "
                         "mmproj.")
    image_size = file.count("clip.vision.image_size")
    patch_size = file.count("clip.vision.patch_size")
    hidden = file.count("clip.vision.embedding_length")
    heads = file.count("clip.vision.attention.head_count")
    blocks = file.count("clip.vision.block_count")
    if image_size % patch_size:
        raise file.fail(f"image size {image_size} is not a multiple of patch size {patch_size}")
    if hidden % heads:
        raise file.fail(f"width {hidden} does not split into {heads} attention heads")
    eps = file.field("clip.vision.attention.layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
        raise file.fail(f"layer_norm_epsilon is {eps!r}, not a number in [0, 1)")
    mean = file.numbers("clip.vision.image_mean", 3)
    std = file.numbers("clip.vision.image_std", 3)
    if min(std) <= 0:
        raise file.fail(f"image_std is {std}, not positive")
    feature = _field(file.reader, "clip.vision.feature_layer")
    # LLaVA reads layer -2: converters drop the last layer, so every block present runs (an
    # explicit feature_layer, as the project writes, names the last one to run).
    run = blocks
    if feature is not None:
        layers = feature if isinstance(feature, list) else [feature]
        if len(layers) != 1 or isinstance(layers[0], bool) or not isinstance(layers[0], int) \
                or layers[0] < 1:
            raise ModelError(f"{path.name}: feature_layer {feature!r} is not a single "
                             "positive layer number (several are LLaVA-NeXT's): the project's encoder computes "
                             "GeoChat's layer -2; use GeoChat's mmproj.")
        run = min(blocks, layers[0])
    grid = image_size // patch_size
    n_positions = grid * grid + 1
    stored = file.tensors.get("v.position_embd.weight")
    if stored is not None and len(stored.shape) == 2 and int(stored.shape[1]) != n_positions:
        raise ModelError(
            f"{path.name}: its position table has {int(stored.shape[1])} rows, "
            f"{image_size} px at patch {patch_size} needs {n_positions}; {_AGAIN}.")
    up = file.tensors.get("v.blk.0.ffn_up.weight")
    ff = file.count("clip.vision.feed_forward_length",
                    int(up.shape[-1]) if up is not None and len(up.shape) == 2 else None)
    layers_read = []
    for i in range(run):
        block = f"v.blk.{i}."
        q, k, v = (file.rows(f"{block}attn_{x}", hidden, hidden) for x in "qkv")
        layers_read.append(ClipLayer(
            (file.tensor(f"{block}ln1.weight", hidden), file.tensor(f"{block}ln1.bias", hidden)),
            (np.ascontiguousarray(np.concatenate([q[0], k[0], v[0]], axis=1)),
             np.concatenate([q[1], k[1], v[1]])),
            file.rows(f"{block}attn_out", hidden, hidden),
            (file.tensor(f"{block}ln2.weight", hidden), file.tensor(f"{block}ln2.bias", hidden)),
            file.rows(f"{block}ffn_up", hidden, ff), file.rows(f"{block}ffn_down", ff, hidden)))
    patch = file.tensor("v.patch_embd.weight", hidden, 3, patch_size, patch_size)
    mm0 = file.rows("mm.0", hidden)
    mm2 = file.rows("mm.2", mm0[0].shape[1])
    width = _field(file.reader, "clip.vision.projection_dim")
    if width is not None and width != mm2[0].shape[1]:
        raise file.fail(f"projection_dim is {width!r} but mm.2 projects to {mm2[0].shape[1]}")
    return ClipVision(
        path=path, projector_type=kind, image_size=image_size, patch_size=patch_size,
        hidden=hidden, heads=heads, eps=float(eps), quick_gelu=not file.flag("clip.use_gelu"),
        mean=mean, std=std,
        class_embd=file.tensor("v.class_embd", hidden),
        patch=np.ascontiguousarray(patch.reshape(hidden, -1).T),
        position=file.tensor("v.position_embd.weight", n_positions, hidden),
        pre_ln=(file.tensor("v.pre_ln.weight", hidden), file.tensor("v.pre_ln.bias", hidden)),
        layers=layers_read, mm0=mm0, mm2=mm2,
    )


def text_embedding_size(path: Optional[str | Path]) -> Optional[int]:
    """``clip.vision.projection_dim`` of an mmproj (None when absent)."""
    import gguf

    value = _field(gguf.GGUFReader(str(path)), "clip.vision.projection_dim")
    return None if value is None else int(value)
