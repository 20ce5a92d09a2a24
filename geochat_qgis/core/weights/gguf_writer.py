"""GeoChat -> llama.cpp: a llama text GGUF plus a CLIP ``mmproj`` GGUF, written with ``gguf``.

The folder this writes holds :data:`TEXT_GGUF` and :data:`MMPROJ_GGUF`, the layout the llama.cpp
backend loads. Both files are streamed tensor by tensor from the checkpoint shards.

The mmproj follows llama.cpp's LLaVA convention (projector type ``mlp``: ``mm.0`` -> GELU ->
``mm.2``) with ``clip.vision.image_size = 504`` and GeoChat's full interpolated 1297-row position
table. CLIP's last layer and post-layernorm are dropped (LLaVA reads layer -2) and
``clip.vision.feature_layer`` names the last kept layer explicitly, so llama.cpp runs exactly the
remaining layers whichever way its default layer count goes. llama.cpp pads non-square images
with (122, 116, 104) for this projector, as GeoChat does.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..families.base import CLIP_MEAN, CLIP_STD
from .geochat_checkpoint import GEOCHAT_IMAGE_SIZE, GeoChatCheckpoint, open_geochat_checkpoint
from .geochat_tensors import (LM_HEAD, PROJECTOR_PREFIX, TEXT_PREFIX, VISION_PREFIX, PlannedTensor,
                              plan_tensors, stream_tensors)
from .geochat_tokenizer import LLAVA_V1_CHAT_TEMPLATE, Vocabulary, geochat_vocabulary
from .output_dir import check_output_dir, staged_output_dir
from .quantize import check_quant, quantize_gguf

TEXT_GGUF = "model.gguf"
MMPROJ_GGUF = "mmproj.gguf"
_UNQUANTISED = "model-unquantised.gguf"

_TEXT_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_VISION_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}
_VISION_FIXED = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
}
_LAYER = re.compile(r"^(?:encoder\.)?layers\.(\d+)\.(.+)\.(weight|bias)$")


def text_gguf_name(name: str) -> Optional[str]:
    """The llama GGUF name of a LLaVA text tensor (None: not a text tensor)."""
    if name == LM_HEAD:
        return "output.weight"
    if not name.startswith(TEXT_PREFIX):
        return None
    rest = name[len(TEXT_PREFIX):]
    if rest == "embed_tokens.weight":
        return "token_embd.weight"
    if rest == "norm.weight":
        return "output_norm.weight"
    match = _LAYER.match(rest)
    return f"blk.{match.group(1)}.{_TEXT_NAMES[match.group(2)]}.{match.group(3)}"


def mmproj_gguf_name(name: str, kept_layers: int) -> Optional[str]:
    """The mmproj GGUF name of a LLaVA vision/projector tensor (None: dropped or not vision)."""
    if name.startswith(PROJECTOR_PREFIX):
        layer, kind = name[len(PROJECTOR_PREFIX):].split(".")
        return f"mm.{0 if layer == 'linear_1' else 2}.{kind}"
    if not name.startswith(VISION_PREFIX):
        return None
    rest = name[len(VISION_PREFIX):]
    if rest in _VISION_FIXED:
        return _VISION_FIXED[rest]
    match = _LAYER.match(rest)
    if match is None or int(match.group(1)) >= kept_layers:
        return None  # post_layernorm and the last layer: LLaVA reads layer -2
    return f"v.blk.{match.group(1)}.{_VISION_NAMES[match.group(2)]}.{match.group(3)}"


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp's interleaved rope layout."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _gguf_dtype(target: str, ndim: int, half: bool) -> np.dtype:
    """float16 for matrices of a half-precision model; norms, biases and embeddings of the
    vision input stay float32."""
    keep_f32 = ndim == 1 or target in ("v.position_embd.weight", "v.class_embd")
    return np.dtype(np.float16 if half and not keep_f32 else np.float32)


def text_writer(path: Path, ckpt: GeoChatCheckpoint, vocab: Vocabulary, half: bool):
    """A GGUFWriter for the llama text model with GeoChat's metadata, vocabulary and chat
    template (tensors still to add); the converter and the demo model (demo_gguf) use it."""
    import gguf

    c = ckpt.config
    heads = int(c["num_attention_heads"])
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(str(c.get("_name_or_path") or "GeoChat").rsplit("/", 1)[-1])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(int(c.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(ckpt.hidden_size)
    writer.add_block_count(ckpt.num_layers)
    writer.add_feed_forward_length(int(c["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(c.get("num_key_value_heads") or heads))
    writer.add_rope_dimension_count(ckpt.hidden_size // heads)
    writer.add_rope_freq_base(float(c.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(vocab.size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([*vocab.pieces, *vocab.added])
    writer.add_token_scores([*vocab.scores, *([-1000.0] * len(vocab.added))])
    writer.add_token_types([*vocab.kinds, *([gguf.TokenType.CONTROL] * len(vocab.added))])
    writer.add_bos_token_id(int(c.get("bos_token_id", 1)))
    writer.add_eos_token_id(int(c.get("eos_token_id", 2)))
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(LLAVA_V1_CHAT_TEMPLATE)
    return writer


def mmproj_writer(path: Path, ckpt: GeoChatCheckpoint, half: bool):
    """A GGUFWriter for the CLIP mmproj at 504 px and the number of vision layers kept."""
    import gguf

    v = ckpt.clip.vision
    kept = int(v["num_hidden_layers"]) - 1
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name("GeoChat mmproj (CLIP-336 at 504 px)")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_bool("clip.use_gelu", v.get("hidden_act", "quick_gelu") == "gelu")
    writer.add_uint32("clip.vision.image_size", GEOCHAT_IMAGE_SIZE)
    writer.add_uint32("clip.vision.patch_size", int(v["patch_size"]))
    writer.add_uint32("clip.vision.embedding_length", int(v["hidden_size"]))
    writer.add_uint32("clip.vision.feed_forward_length", int(v["intermediate_size"]))
    writer.add_uint32("clip.vision.projection_dim", ckpt.hidden_size)
    writer.add_uint32("clip.vision.attention.head_count", int(v["num_attention_heads"]))
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", float(v.get("layer_norm_eps", 1e-5)))
    writer.add_uint32("clip.vision.block_count", kept)
    writer.add_array("clip.vision.feature_layer", [kept])
    writer.add_array("clip.vision.image_mean", list(CLIP_MEAN))
    writer.add_array("clip.vision.image_std", list(CLIP_STD))
    return writer, kept


def _write_pair(folder: Path, text_name: str, ckpt: GeoChatCheckpoint, vocab: Vocabulary,
                plan: list[PlannedTensor], progress: Optional[Callable[[int, int, str], None]]) -> None:
    half = plan[0].dtype != "float32"
    text = text_writer(folder / text_name, ckpt, vocab, half)
    mmproj, kept = mmproj_writer(folder / MMPROJ_GGUF, ckpt, half)
    heads = int(ckpt.config["num_attention_heads"])
    kv_heads = int(ckpt.config.get("num_key_value_heads") or heads)
    routes: dict[str, tuple[object, str]] = {}
    for item in plan:
        target = text_gguf_name(item.name)
        writer = text
        if target is None:
            target, writer = mmproj_gguf_name(item.name, kept), mmproj
        if target is None:
            continue
        dtype = _gguf_dtype(target, len(item.shape), half)
        writer.add_tensor_info(target, item.shape, dtype, int(np.prod(item.shape)) * dtype.itemsize)
        routes[item.name] = (writer, target)
    for writer in (text, mmproj):
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    done = 0
    for item, tensor in stream_tensors(plan):
        done += 1
        if progress:
            progress(done, len(plan), item.name)
        if item.name not in routes:
            continue
        writer, target = routes[item.name]
        dtype = _gguf_dtype(target, len(item.shape), half)
        array = tensor.to("float16" if dtype == np.float16 else "float32").array
        if target.endswith("attn_q.weight") and writer is text:
            array = _permute(array, heads)
        elif target.endswith("attn_k.weight") and writer is text:
            array = _permute(array, kv_heads)
        writer.write_tensor_data(np.ascontiguousarray(array))
    for writer in (text, mmproj):
        writer.close()


def convert_geochat_to_gguf(src: Path, out: Path, clip: Optional[Path] = None,
                            quant: Optional[str] = None, dtype: Optional[str] = None,
                            progress: Optional[Callable[[int, int, str], None]] = None) -> Path:
    """Convert the GeoChat checkpoint in ``src`` into ``out``/{model.gguf, mmproj.gguf}.

    ``quant`` (``q8_0`` or ``q4_k_m``) quantises the text model through llama.cpp; the mmproj
    stays float. ``dtype``: ``float32`` or ``float16`` (default: float32 for a float32
    checkpoint, float16 otherwise). Returns ``out``, which appears only when complete.
    """
    check_output_dir(out)
    if quant:
        check_quant(quant)
    ckpt = open_geochat_checkpoint(Path(src), clip)
    vocab = geochat_vocabulary(Path(src), ckpt.added_tokens())
    dtype = dtype or ("float32" if ckpt.dtype == "float32" else "float16")
    plan = plan_tensors(ckpt, vocab.size, dtype)
    with staged_output_dir(Path(out)) as stage:
        _write_pair(stage, _UNQUANTISED if quant else TEXT_GGUF, ckpt, vocab, plan, progress)
        if quant:
            quantize_gguf(stage / _UNQUANTISED, stage / TEXT_GGUF, quant)
            (stage / _UNQUANTISED).unlink()
    return Path(out)

