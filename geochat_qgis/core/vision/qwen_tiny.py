"""A tiny random-weight Qwen2.5-VL GGUF pair written with ``gguf`` + numpy (no torch).

The mmproj (``qwen2.5vl_merger``: window attention, full-attention blocks, the 2x2 merger) and a
``qwen2vl`` text model with M-RoPE sections and a byte-level BPE vocabulary that holds Qwen's
chat-template tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``...), so llama.cpp's
Qwen25VLChatHandler runs it end to end. The libmtmd self-test and the tests use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .qwen_mmproj import write_qwen_mmproj
from .qwen_numpy import QwenBlock, QwenVision

#: Qwen2's control tokens, in the order they follow the byte pieces here
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>")
_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"))


@dataclass(frozen=True)
class QwenDims:
    hidden: int = 32  # vision width
    heads: int = 2
    ff: int = 48  # != hidden (llama.cpp swaps equal-width ffn_up/down)
    blocks: int = 4
    wa_pattern: int = 2  # blocks 1 and 3 attend to the whole image, 0 and 2 in 112-px windows
    n_embd: int = 64  # text width (the merger's output)
    text_layers: int = 1
    text_heads: int = 4
    text_kv_heads: int = 2
    text_ff: int = 128
    sections: tuple[int, int, int, int] = (2, 3, 3, 0)  # M-RoPE: half the text head (16 / 2)
    context: int = 4096


def random_qwen_vision(dims: QwenDims = QwenDims(), seed: int = 0) -> QwenVision:
    """Random weights at a scale that keeps every layer's activations of order one."""
    rng = np.random.default_rng(seed)
    d, ff, merged = dims.hidden, dims.ff, dims.hidden * 4

    def normal(*shape: int, std: float = 1.0, mean: float = 0.0) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
                + np.float32(mean))

    def linear(fan_in: int, out: int) -> tuple[np.ndarray, np.ndarray]:
        return normal(fan_in, out, std=fan_in ** -0.5), normal(out, std=0.1)

    def norm(width: int) -> np.ndarray:
        return normal(width, std=0.1, mean=1.0)

    blocks = [QwenBlock(norm(d), linear(d, 3 * d), linear(d, d), norm(d), linear(d, ff),
                        linear(d, ff), linear(ff, d)) for _ in range(dims.blocks)]
    return QwenVision(
        heads=dims.heads,
        full_blocks=tuple(range(dims.wa_pattern - 1, dims.blocks, dims.wa_pattern)),
        patch=normal(3 * 2 * 14 * 14, d, std=(3 * 2 * 14 * 14) ** -0.5), blocks=blocks,
        ln_q=norm(d), mlp0=linear(merged, merged), mlp2=linear(merged, dims.n_embd))


def write_qwen_tiny_mmproj(path: str | Path, dims: QwenDims = QwenDims(), seed: int = 0
                           ) -> tuple[Path, QwenVision]:
    """The mmproj GGUF and the weights it holds."""
    vision = random_qwen_vision(dims, seed)
    return write_qwen_mmproj(path, vision), vision


def _byte_pieces() -> list[str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for
    the code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    pieces, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            pieces[byte] = chr(byte)
        else:
            pieces[byte] = chr(256 + extra)
            extra += 1
    return [pieces[b] for b in range(256)]


def qwen_vocabulary() -> tuple[list[str], list[int], list[str]]:
    """(pieces, token types, merges): the 256 byte pieces, a few merged pieces, then Qwen's
    control tokens."""
    pieces = _byte_pieces() + ["".join(pair) for pair in _MERGES]
    kinds = [1] * len(pieces) + [3] * len(SPECIAL_TOKENS)  # normal, control
    return pieces + list(SPECIAL_TOKENS), kinds, [" ".join(pair) for pair in _MERGES]


def write_qwen_text_gguf(path: str | Path, dims: QwenDims = QwenDims(), seed: int = 1) -> Path:
    """A ``qwen2vl`` text GGUF with random weights; control tokens are never sampled (an output
    bias of -100), so greedy answers are text."""
    import gguf

    pieces, kinds, merges = qwen_vocabulary()
    rng = np.random.default_rng(seed)
    h, head = dims.n_embd, dims.n_embd // dims.text_heads
    if sum(dims.sections) * 2 != head:
        raise ValueError(f"M-RoPE sections {dims.sections} must cover half the head ({head})")
    kv = dims.text_kv_heads * head

    def normal(*shape: int, std: float = 1.0, mean: float = 0.0) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
                + np.float32(mean))

    def weight(out: int, fan_in: int, gain: float = 1.0) -> np.ndarray:
        return normal(out, fan_in, std=gain / fan_in ** 0.5)

    writer = gguf.GGUFWriter(str(path), "qwen2vl")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in (("context_length", dims.context), ("embedding_length", h),
                       ("block_count", dims.text_layers), ("feed_forward_length", dims.text_ff),
                       ("attention.head_count", dims.text_heads),
                       ("attention.head_count_kv", dims.text_kv_heads)):
        writer.add_uint32(f"qwen2vl.{key}", value)
    writer.add_float32("qwen2vl.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32("qwen2vl.rope.freq_base", 1e6)
    writer.add_array("qwen2vl.rope.dimension_sections", list(dims.sections))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(pieces)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    first = len(pieces) - len(SPECIAL_TOKENS)
    writer.add_bos_token_id(first)  # <|endoftext|>
    writer.add_eos_token_id(first + 2)  # <|im_end|>
    writer.add_pad_token_id(first)
    writer.add_add_bos_token(False)
    writer.add_tensor("token_embd.weight", normal(len(pieces), h))
    for i in range(dims.text_layers):
        name = f"blk.{i}."
        writer.add_tensor(f"{name}attn_norm.weight", normal(h, std=0.1, mean=1.0))
        for part, width in (("q", h), ("k", kv), ("v", kv)):
            writer.add_tensor(f"{name}attn_{part}.weight", weight(width, h))
            writer.add_tensor(f"{name}attn_{part}.bias", normal(width, std=0.1))
        writer.add_tensor(f"{name}attn_output.weight", weight(h, h))
        writer.add_tensor(f"{name}ffn_norm.weight", normal(h, std=0.1, mean=1.0))
        writer.add_tensor(f"{name}ffn_gate.weight", weight(dims.text_ff, h))
        writer.add_tensor(f"{name}ffn_up.weight", weight(dims.text_ff, h))
        writer.add_tensor(f"{name}ffn_down.weight", weight(h, dims.text_ff))
    writer.add_tensor("output_norm.weight", normal(h, std=0.1, mean=1.0))
    writer.add_tensor("output.weight", weight(len(pieces), h, gain=6.0))
    bias = np.zeros(len(pieces), np.float32)
    bias[first:] = -100.0
    writer.add_tensor("output.bias", bias)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_qwen_pair(folder: str | Path, dims: QwenDims = QwenDims(), seed: int = 0
                    ) -> tuple[Path, Path]:
    """``(text GGUF, mmproj GGUF)`` of a tiny Qwen2.5-VL in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mmproj, _ = write_qwen_tiny_mmproj(folder / "mmproj-qwen-tiny.gguf", dims, seed)
    return write_qwen_text_gguf(folder / "qwen-tiny.gguf", dims, seed + 1), mmproj
