"""Qwen2.5-VL mmproj GGUFs (projector type ``qwen2.5vl_merger``) to and from :class:`QwenVision`.

Keys and tensor names are the ones llama.cpp's clip loader reads (tools/mtmd/clip.cpp of the
llama.cpp that llama-cpp-python 0.3.36 vendors) and its converter writes: the Conv3d patch
kernel split into ``v.patch_embd.weight`` (frame 0) and ``v.patch_embd.weight.1`` (frame 1),
``qkv`` split into ``attn_q/k/v``, RMSNorm weights ``v.blk.N.ln1/ln2``, the merger's norm as
``v.post_ln``, its MLP as ``mm.0`` and ``mm.2``, ``clip.use_silu`` and ``clip.vision.n_wa_pattern``
(every n-th block attends to the whole image).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelError
from .mmproj import _array, _field, _kind
from .qwen_numpy import QwenBlock, QwenVision

PROJECTOR = "qwen2.5vl_merger"


def _wa_pattern(vision: QwenVision) -> int:
    """n with blocks n-1, 2n-1, ... full: the only layout llama.cpp's loader can express."""
    full = sorted(vision.full_blocks)
    step = full[0] + 1 if full else 0
    if not full or full != list(range(step - 1, len(vision.blocks), step)):
        raise ValueError(f"full-attention blocks {full} are not every n-th block of "
                         f"{len(vision.blocks)}: llama.cpp cannot express them")
    return step


def write_qwen_mmproj(path: str | Path, vision: QwenVision, image_size: int = 560) -> Path:
    """Write ``vision`` as an F32 mmproj GGUF for llama.cpp's ``qwen2.5vl_merger`` graph."""
    import gguf

    d, p, t = vision.hidden, vision.patch_size, vision.temporal
    if t != 2 or vision.merge != 2 or vision.window != 112:
        raise ValueError("llama.cpp's Qwen2.5-VL graph needs temporal_patch_size 2, "
                         "spatial_merge_size 2 and 112-px windows")
    ff = int(vision.blocks[0].up[0].shape[1])
    if ff == d:
        raise ValueError("llama.cpp swaps ffn_up/ffn_down when their widths agree: use ff != d")
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_string("clip.projector_type", PROJECTOR)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.use_silu", True)
    for key, value in (("image_size", image_size), ("patch_size", p), ("embedding_length", d),
                       ("feed_forward_length", ff), ("projection_dim", vision.out_dim),
                       ("attention.head_count", vision.heads),
                       ("block_count", len(vision.blocks)), ("n_wa_pattern", _wa_pattern(vision))):
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", vision.eps)
    writer.add_array("clip.vision.image_mean", list(vision.mean))
    writer.add_array("clip.vision.image_std", list(vision.std))

    def add(name: str, value: np.ndarray) -> None:
        writer.add_tensor(name, np.ascontiguousarray(value, np.float32))

    def linear(name: str, weights: tuple[np.ndarray, np.ndarray]) -> None:
        add(f"{name}.weight", weights[0].T)  # torch's (out, in)
        add(f"{name}.bias", weights[1])

    kernel = vision.patch.T.reshape(d, 3, t, p, p)
    add("v.patch_embd.weight", kernel[:, :, 0])
    add("v.patch_embd.weight.1", kernel[:, :, 1])
    for i, block in enumerate(vision.blocks):
        name = f"v.blk.{i}."
        add(f"{name}ln1.weight", block.norm1)
        for j, part in enumerate("qkv"):
            linear(f"{name}attn_{part}", (block.qkv[0][:, j * d:(j + 1) * d],
                                          block.qkv[1][j * d:(j + 1) * d]))
        linear(f"{name}attn_out", block.proj)
        add(f"{name}ln2.weight", block.norm2)
        linear(f"{name}ffn_gate", block.gate)
        linear(f"{name}ffn_up", block.up)
        linear(f"{name}ffn_down", block.down)
    add("v.post_ln.weight", vision.ln_q)
    linear("mm.0", vision.mlp0)
    linear("mm.2", vision.mlp2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def read_qwen_mmproj(path: str | Path) -> QwenVision:
    """The vision tower and merger of a ``qwen2.5vl_merger`` mmproj; ModelError if incomplete."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path.name} is not a readable mmproj GGUF ({exc}).") from exc
    kind = _kind(reader)  # newer converters write clip.vision.projector_type
    if kind != PROJECTOR:
        raise ModelError(f"{path.name}: projector type {kind!r}, not {PROJECTOR!r}.")
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ModelError(f"{path.name} lacks tensor {name}: not a complete Qwen2.5-VL mmproj.")
        return _array(tensors[name])

    def linear(name: str) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(get(f"{name}.weight").T), get(f"{name}.bias")

    def number(key: str, default=None):
        value = _field(reader, f"clip.vision.{key}", default)
        if value is None:
            raise ModelError(f"{path.name} lacks clip.vision.{key}.")
        return value

    count, pattern = int(number("block_count")), int(number("n_wa_pattern"))
    blocks = []
    for i in range(count):
        name = f"v.blk.{i}."
        q, k, v = (linear(f"{name}attn_{x}") for x in "qkv")
        blocks.append(QwenBlock(
            get(f"{name}ln1.weight"),
            (np.ascontiguousarray(np.concatenate([q[0], k[0], v[0]], axis=1)),
             np.concatenate([q[1], k[1], v[1]])),
            linear(f"{name}attn_out"), get(f"{name}ln2.weight"), linear(f"{name}ffn_gate"),
            linear(f"{name}ffn_up"), linear(f"{name}ffn_down")))
    kernel = np.stack([get("v.patch_embd.weight"), get("v.patch_embd.weight.1")], axis=2)
    return QwenVision(
        heads=int(number("attention.head_count")),
        full_blocks=tuple(i for i in range(count) if not pattern or (i + 1) % pattern == 0),
        patch=np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T), blocks=blocks,
        ln_q=get("v.post_ln.weight"), mlp0=linear("mm.0"), mlp2=linear("mm.2"),
        patch_size=int(number("patch_size")),
        eps=float(number("attention.layer_norm_epsilon", 1e-6)),
        mean=tuple(float(x) for x in number("image_mean")),
        std=tuple(float(x) for x in number("image_std")), path=path)
