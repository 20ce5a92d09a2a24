"""A GGUF's header checked against the tensors it holds, before llama.cpp sees the file.

llama.cpp trusts the header: a block count larger than the blocks present, a size that does not
match the tensors, or a weight stored as integers aborts or crashes the whole process (SIGABRT,
SIGSEGV) with nothing said. These checks read only the header and the tensor table (no weights)
and raise ModelError naming the file, the value and what the file actually holds.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ModelError

#: tensor types no model weight is stored in (integer tables, doubles): llama.cpp cannot
#: multiply with them
_NOT_WEIGHTS = frozenset({"I8", "I16", "I32", "I64", "F64"})
#: text architectures run here whose blocks are the LLaMA layout (qwen2vl adds q/k/v biases)
_LLAMA_LAYOUT = frozenset({"llama", "qwen2vl"})
_BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                  "ffn_gate", "ffn_up", "ffn_down")
_BLOCK = re.compile(r"^(v\.)?blk\.(\d+)\.")


def _fail(path: Path, problem: str) -> ModelError:
    return ModelError(f"{path} is not a usable GGUF model: {problem}. The file is damaged "
                      "or was written wrongly: download or convert it again.")


def check_gguf_tensors(reader: Any, path: Path, architecture: str,
                       field: Callable[[Any, str], Any]) -> None:
    """ModelError when ``reader``'s header and tensors disagree in a way that would crash
    llama.cpp (``field(reader, key)`` reads one header value)."""
    shapes: dict[str, list[int]] = {}
    for tensor in reader.tensors:
        kind = getattr(tensor.tensor_type, "name", str(tensor.tensor_type))
        if kind in _NOT_WEIGHTS:
            raise _fail(path, f"tensor {tensor.name} is stored as {kind}, a type no model "
                              "weight has (llama.cpp would crash on it)")
        shapes[tensor.name] = [int(n) for n in tensor.shape]
    if architecture == "clip":
        _check_blocks(path, shapes, field(reader, "clip.vision.block_count"), "clip.vision",
                      vision=True)
        return
    count = field(reader, f"{architecture}.block_count")
    _check_blocks(path, shapes, count, architecture, vision=False)
    if architecture in _LLAMA_LAYOUT:
        _check_llama(path, shapes, reader, architecture, int(count or 0), field)


def _check_blocks(path: Path, shapes: dict[str, list[int]], count: Any, prefix: str,
                  vision: bool) -> None:
    """The header's block count against the blocks whose tensors are present: a text model
    must hold exactly blocks 0..count-1; a vision tower at least those (converters may keep
    one more than LLaVA reads)."""
    present = {int(m.group(2)) for name in shapes if (m := _BLOCK.match(name))
               and bool(m.group(1)) == vision}
    if count is None:
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise _fail(path, f"{prefix}.block_count is {count!r}, not a positive whole number")
    missing = sorted(set(range(count)) - present)
    extra = sorted(present - set(range(count)))
    if missing or (extra and not vision):
        holds = f"blocks 0-{max(present)}" if present else "no block"
        raise _fail(path, f"the header says {prefix}.block_count = {count} but the file holds "
                          f"{holds} ({len(present)} in all)")


def _check_llama(path: Path, shapes: dict[str, list[int]], reader: Any, arch: str, count: int,
                 field: Callable[[Any, str], Any]) -> None:
    """Sizes in the header against the tensors of a LLaMA-layout text model."""
    def need(name: str) -> list[int]:
        if name not in shapes:
            raise _fail(path, f"tensor {name} is missing (a {arch} model needs it)")
        return shapes[name]

    def number(key: str) -> Optional[int]:
        value = field(reader, f"{arch}.{key}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise _fail(path, f"{arch}.{key} is {value!r}, not a positive whole number")
        return value

    embedding = need("token_embd.weight")
    if len(embedding) != 2:
        raise _fail(path, f"token_embd.weight has shape {embedding}, not (embedding, vocabulary)")
    embd, vocab = embedding
    need("output_norm.weight")
    header_embd, ff = number("embedding_length"), number("feed_forward_length")
    heads, kv_heads = number("attention.head_count"), number("attention.head_count_kv")
    number("context_length")
    if header_embd is not None and header_embd != embd:
        raise _fail(path, f"{arch}.embedding_length is {header_embd} but token_embd.weight "
                          f"has {embd}")
    if heads is not None and embd % heads:
        raise _fail(path, f"{arch}.attention.head_count {heads} does not divide the "
                          f"embedding size {embd}")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise _fail(path, f"{arch}.attention.head_count_kv {kv_heads} does not divide "
                          f"head_count {heads}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and vocab and len(tokens.data) != vocab:
        raise _fail(path, f"the vocabulary has {len(tokens.data)} tokens but token_embd.weight "
                          f"has {vocab} rows")
    kv_width = embd // heads * (kv_heads or heads) if heads else None
    for i in range(count):
        block = {part: need(f"blk.{i}.{part}.weight") for part in _BLOCK_TENSORS}
        expected = {"attn_norm": [embd], "ffn_norm": [embd], "attn_q": [embd, embd],
                    "attn_output": [embd, embd], "ffn_up": [embd, ff or block["ffn_up"][-1]],
                    "ffn_gate": [embd, ff or block["ffn_up"][-1]],
                    "ffn_down": [ff or block["ffn_up"][-1], embd]}
        if kv_width:
            expected.update(attn_k=[embd, kv_width], attn_v=[embd, kv_width])
        for part, shape in expected.items():
            if block[part] != shape:
                raise _fail(path, f"tensor blk.{i}.{part}.weight has shape {block[part]} but "
                                  f"the header's sizes need {shape}")
