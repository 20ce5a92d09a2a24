"""The demo model's GGUF pair written straight from numpy: no torch, no checkpoint, no conversion.

A user's runtime for the llama.cpp backend holds llama-cpp-python, numpy, gguf and sentencepiece
but not torch (and Python 3.13 has no CPU torch build on PyPI), so the demo model the dock offers
before any download must not need torch. The tensors are random at the tiny dimensions of
:mod:`tiny` (same scales), already in llama.cpp's names and layout, with the same metadata,
vocabulary and chat template as a converted GeoChat (:mod:`gguf_writer`), so the llama.cpp
backend loads the demo exactly as it loads a converted 7B model.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from .geochat_checkpoint import IMAGE_PATCH_TOKEN
from .geochat_tokenizer import TOKENIZER_MODEL, geochat_vocabulary
from .gguf_writer import MMPROJ_GGUF, TEXT_GGUF, mmproj_writer, text_writer
from .output_dir import staged_output_dir
from .tiny import SP_VOCAB, TEXT, VISION, geochat_config, train_tokenizer

if TYPE_CHECKING:
    import numpy as np

GRID = 36  # 504 px / 14 px patches


class _Random:
    """Random float32 arrays with the scales of :class:`tiny._Init` (activations O(1))."""

    def __init__(self, seed: int) -> None:
        import numpy as np

        self.np = np
        self.rng = np.random.default_rng(seed)

    def normal(self, *shape: int, std: float = 1.0, mean: float = 0.0) -> "np.ndarray":
        return (self.rng.standard_normal(shape) * std + mean).astype(self.np.float32)

    def linear(self, out: int, fan_in: int, gain: float = 1.0) -> "np.ndarray":
        return self.normal(out, fan_in, std=gain / fan_in ** 0.5)

    def norm(self, size: int) -> "np.ndarray":
        return self.normal(size, std=0.1, mean=1.0)


def _vision_tensors(r: _Random, kept: int) -> dict[str, "np.ndarray"]:
    d, ff, p = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]
    tensors = {
        "v.class_embd": r.normal(d),
        "v.patch_embd.weight": r.normal(d, 3, p, p, std=(3 * p * p) ** -0.5),
        "v.position_embd.weight": r.normal(GRID * GRID + 1, d, std=0.5),
        "v.pre_ln.weight": r.norm(d),
        "v.pre_ln.bias": r.normal(d, std=0.1),
    }
    for i in range(kept):
        layer = f"v.blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors[f"{layer}{name}.weight"] = r.linear(d, d)
            tensors[f"{layer}{name}.bias"] = r.normal(d, std=0.05)
        for name in ("ln1", "ln2"):
            tensors[f"{layer}{name}.weight"] = r.norm(d)
            tensors[f"{layer}{name}.bias"] = r.normal(d, std=0.1)
        tensors[f"{layer}ffn_up.weight"] = r.linear(ff, d)
        tensors[f"{layer}ffn_up.bias"] = r.normal(ff, std=0.05)
        tensors[f"{layer}ffn_down.weight"] = r.linear(d, ff)
        tensors[f"{layer}ffn_down.bias"] = r.normal(d, std=0.05)
    h = TEXT["hidden_size"]
    tensors["mm.0.weight"] = r.linear(h, d, gain=2.0)
    tensors["mm.0.bias"] = r.normal(h, std=0.1)
    tensors["mm.2.weight"] = r.linear(h, h, gain=2.0)
    tensors["mm.2.bias"] = r.normal(h, std=0.1)
    return tensors


def _text_tensors(r: _Random, vocab_size: int) -> dict[str, "np.ndarray"]:
    h, ff = TEXT["hidden_size"], TEXT["intermediate_size"]
    tensors = {"token_embd.weight": r.normal(vocab_size, h)}
    for i in range(TEXT["num_hidden_layers"]):
        layer = f"blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors[f"{layer}{name}.weight"] = r.linear(h, h)
        tensors[f"{layer}ffn_gate.weight"] = r.linear(ff, h)
        tensors[f"{layer}ffn_up.weight"] = r.linear(ff, h)
        tensors[f"{layer}ffn_down.weight"] = r.linear(h, ff)
        tensors[f"{layer}attn_norm.weight"] = r.norm(h)
        tensors[f"{layer}ffn_norm.weight"] = r.norm(h)
    tensors["output_norm.weight"] = r.norm(h)
    tensors["output.weight"] = r.linear(vocab_size, h, gain=6.0)
    return tensors


def _write(writer, tensors: dict[str, "np.ndarray"]) -> None:
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_demo_gguf(out: Path, seed: int = 0) -> Path:
    """Write ``out``/{model.gguf, mmproj.gguf} (``out`` appears only when complete)."""
    config = {**geochat_config(), "_name_or_path": "geochat-tiny-demo"}
    vision = {**VISION, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    ckpt = SimpleNamespace(config=config, hidden_size=TEXT["hidden_size"],
                           num_layers=TEXT["num_hidden_layers"],
                           clip=SimpleNamespace(vision=vision))
    random = _Random(seed)
    with tempfile.TemporaryDirectory(prefix="geochat-demo-") as tmp:
        (Path(tmp) / TOKENIZER_MODEL).write_bytes(train_tokenizer(SP_VOCAB))
        vocab = geochat_vocabulary(Path(tmp), [IMAGE_PATCH_TOKEN])
        with staged_output_dir(Path(out)) as stage:
            mmproj, kept = mmproj_writer(stage / MMPROJ_GGUF, ckpt, half=False)
            _write(mmproj, _vision_tensors(random, kept))
            _write(text_writer(stage / TEXT_GGUF, ckpt, vocab, half=False),
                   _text_tensors(random, vocab.size))
    return Path(out)
