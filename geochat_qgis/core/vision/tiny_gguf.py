"""Random-weight GGUFs written with ``gguf`` + numpy (no torch): an LLaVA ``mlp`` mmproj of any
CLIP size, and a Llama text model of any size with a byte-level vocabulary.

The libmtmd self-test uses a tiny mmproj; the benchmarks use CLIP ViT-L/14 at 504 px and a
Llama of about 1B parameters. The same seed gives the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..families.base import CLIP_MEAN, CLIP_STD


@dataclass(frozen=True)
class ClipDims:
    image_size: int = 56
    patch_size: int = 14
    hidden: int = 16
    heads: int = 2
    ff: int = 32
    blocks: int = 2  # layers kept (LLaVA's layer -2: the converter already dropped the last)
    projector_hidden: int = 16  # mm.0's output width


#: CLIP ViT-L/14-336 (GeoChat's tower) at 504 px, 23 of its 24 layers (layer -2)
VIT_L_504 = ClipDims(image_size=504, patch_size=14, hidden=1024, heads=16, ff=4096, blocks=23,
                     projector_hidden=4096)


@dataclass(frozen=True)
class LlamaDims:
    n_embd: int = 64
    layers: int = 1
    ff: int = 128
    heads: int = 4
    kv_heads: int = 4
    context: int = 4096


#: about 1.1B parameters (TinyLlama's shape)
LLAMA_1B = LlamaDims(n_embd=2048, layers=22, ff=5632, heads=32, kv_heads=4)
#: GeoChat-7B / Vicuna-7B v1.5
LLAMA_7B = LlamaDims(n_embd=4096, layers=32, ff=11008, heads=32, kv_heads=32)


class _Random:
    def __init__(self, seed: int, dtype: np.dtype) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype

    def normal(self, *shape: int, std: float = 1.0, mean: float = 0.0, keep32: bool = False):
        data = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        if mean:
            data += np.float32(mean)
        return data if keep32 or len(shape) == 1 else data.astype(self.dtype)

    def linear(self, out: int, fan_in: int, gain: float = 1.0):
        return self.normal(out, fan_in, std=gain / fan_in ** 0.5)


def write_mlp_mmproj(path: Path, n_embd: int, dims: ClipDims = ClipDims(), seed: int = 0,
                     half: bool = False) -> Path:
    """An LLaVA ``mlp`` mmproj as the project's converter writes it (CLS row first in the
    position table, explicit feature layer), random weights, projecting to ``n_embd``."""
    import gguf

    r = _Random(seed, np.dtype(np.float16 if half else np.float32))
    d, p = dims.hidden, dims.patch_size
    grid = dims.image_size // p
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_bool("clip.use_gelu", False)
    for key, value in (("image_size", dims.image_size), ("patch_size", p),
                       ("embedding_length", d), ("feed_forward_length", dims.ff),
                       ("projection_dim", n_embd), ("attention.head_count", dims.heads),
                       ("block_count", dims.blocks)):
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.feature_layer", [dims.blocks])
    writer.add_array("clip.vision.image_mean", list(CLIP_MEAN))
    writer.add_array("clip.vision.image_std", list(CLIP_STD))
    writer.add_tensor("v.class_embd", r.normal(d))
    writer.add_tensor("v.patch_embd.weight", r.normal(d, 3, p, p, std=(3 * p * p) ** -0.5))
    writer.add_tensor("v.position_embd.weight", r.normal(grid * grid + 1, d, std=0.5, keep32=True))
    writer.add_tensor("v.pre_ln.weight", r.normal(d, std=0.1, mean=1.0))
    writer.add_tensor("v.pre_ln.bias", r.normal(d, std=0.1))
    for i in range(dims.blocks):
        block = f"v.blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"{block}{name}.weight", r.linear(d, d))
            writer.add_tensor(f"{block}{name}.bias", r.normal(d, std=0.05))
        for name in ("ln1", "ln2"):
            writer.add_tensor(f"{block}{name}.weight", r.normal(d, std=0.1, mean=1.0))
            writer.add_tensor(f"{block}{name}.bias", r.normal(d, std=0.1))
        writer.add_tensor(f"{block}ffn_up.weight", r.linear(dims.ff, d))
        writer.add_tensor(f"{block}ffn_up.bias", r.normal(dims.ff, std=0.05))
        writer.add_tensor(f"{block}ffn_down.weight", r.linear(d, dims.ff))
        writer.add_tensor(f"{block}ffn_down.bias", r.normal(d, std=0.05))
    writer.add_tensor("mm.0.weight", r.linear(dims.projector_hidden, d, gain=2.0))
    writer.add_tensor("mm.0.bias", r.normal(dims.projector_hidden, std=0.1))
    writer.add_tensor("mm.2.weight", r.linear(n_embd, dims.projector_hidden, gain=2.0))
    writer.add_tensor("mm.2.bias", r.normal(n_embd, std=0.1))
    _finish(writer)
    return Path(path)


def byte_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s> and the 256 byte pieces (SentencePiece byte fallback)."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    kinds = [2, 3, 3, *([6] * 256)]
    return pieces, [0.0] * len(pieces), kinds


def write_llama_gguf(path: Path, dims: LlamaDims = LlamaDims(), seed: int = 0, half: bool = False,
                     vocab: Optional[tuple[Sequence[str], Sequence[float], Sequence[int]]] = None
                     ) -> Path:
    """A Llama text GGUF with random weights; ``vocab`` (pieces, scores, SentencePiece types)
    defaults to :func:`byte_vocabulary`."""
    import gguf

    pieces, scores, kinds = vocab or byte_vocabulary()
    r = _Random(seed, np.dtype(np.float16 if half else np.float32))
    h, head = dims.n_embd, dims.n_embd // dims.heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(dims.context)
    writer.add_embedding_length(h)
    writer.add_block_count(dims.layers)
    writer.add_feed_forward_length(dims.ff)
    writer.add_head_count(dims.heads)
    writer.add_head_count_kv(dims.kv_heads)
    writer.add_rope_dimension_count(head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(pieces))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(pieces))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(kinds))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_tensor("token_embd.weight", r.normal(len(pieces), h))
    for i in range(dims.layers):
        block = f"blk.{i}."
        writer.add_tensor(f"{block}attn_norm.weight", r.normal(h, std=0.1, mean=1.0))
        writer.add_tensor(f"{block}attn_q.weight", r.linear(h, h))
        writer.add_tensor(f"{block}attn_k.weight", r.linear(dims.kv_heads * head, h))
        writer.add_tensor(f"{block}attn_v.weight", r.linear(dims.kv_heads * head, h))
        writer.add_tensor(f"{block}attn_output.weight", r.linear(h, h))
        writer.add_tensor(f"{block}ffn_norm.weight", r.normal(h, std=0.1, mean=1.0))
        writer.add_tensor(f"{block}ffn_gate.weight", r.linear(dims.ff, h))
        writer.add_tensor(f"{block}ffn_up.weight", r.linear(dims.ff, h))
        writer.add_tensor(f"{block}ffn_down.weight", r.linear(h, dims.ff))
    writer.add_tensor("output_norm.weight", r.normal(h, std=0.1, mean=1.0))
    writer.add_tensor("output.weight", r.linear(len(pieces), h, gain=6.0))
    _finish(writer)
    return Path(path)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
