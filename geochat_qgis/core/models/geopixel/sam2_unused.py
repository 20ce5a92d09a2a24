"""The SAM-2 tensors GeoPixel's checkpoint holds but image segmentation never runs.

GeoPixel builds a whole ``SAM2Base`` (the video model): its memory attention, memory encoder,
object-pointer projection and memory embeddings are saved in the checkpoint under
``model.visual_model.`` but only the image encoder, the prompt encoder, the mask decoder and
``no_mem_embed`` compute a mask. The loader skips these names (:func:`is_unused`); the tiny maker
writes them (:func:`unused_checkpoint_shapes`) so a tiny checkpoint has the published layout.
Layout read from GeoPixel's ``sam2_hiera_l.yaml``, memory_attention.py and memory_encoder.py;
widths tied to the SAM width (256 for Hiera-L) follow ``d_model``, the others (memory width 64,
FFN 2048) are the checkpoint's own (:class:`Sam2Config` reads them from the shapes).
No torch here: the GeoPixel reference environment imports it too.
"""
from __future__ import annotations

from .sam2_config import VISUAL_PREFIX, Sam2Config

UNUSED_ROOTS = ("memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr",
                "obj_ptr_proj.", "mask_downsample.")
MASK_DOWNSAMPLER_CHANNELS = (1, 4, 16, 64, 256)  # stride 2 to total stride 16, x4 channels each


def is_unused(name: str) -> bool:
    """True for a full checkpoint name of SAM-2's video parts (never loaded)."""
    return name.startswith(VISUAL_PREFIX) and name[len(VISUAL_PREFIX):].startswith(UNUSED_ROOTS)


def _linear(name: str, out_dim: int, in_dim: int) -> dict[str, tuple[int, ...]]:
    return {name + ".weight": (out_dim, in_dim), name + ".bias": (out_dim,)}


def _norm(name: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {name + ".weight": (dim,), name + ".bias": (dim,)}


def _conv(name: str, out_dim: int, in_dim: int, kernel: int) -> dict[str, tuple[int, ...]]:
    return {name + ".weight": (out_dim, in_dim, kernel, kernel), name + ".bias": (out_dim,)}


def _memory_attention(config: Sam2Config) -> dict[str, tuple[int, ...]]:
    d, m = config.d_model, config.mem_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(config.mem_layers):
        layer = f"memory_attention.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update(_linear(layer + "self_attn." + proj, d, d))
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update(_linear(layer + "cross_attn_image." + proj, d, m if proj in ("k_proj", "v_proj") else d))
        shapes.update(_linear(layer + "linear1", config.mem_ffn, d))
        shapes.update(_linear(layer + "linear2", d, config.mem_ffn))
        for norm in ("norm1", "norm2", "norm3"):
            shapes.update(_norm(layer + norm, d))
    shapes.update(_norm("memory_attention.norm", d))
    return shapes


def _memory_encoder(config: Sam2Config) -> dict[str, tuple[int, ...]]:
    d, m = config.d_model, config.mem_dim
    shapes: dict[str, tuple[int, ...]] = {}
    chans = MASK_DOWNSAMPLER_CHANNELS
    for i in range(len(chans) - 1):
        shapes.update(_conv(f"memory_encoder.mask_downsampler.encoder.{3 * i}", chans[i + 1], chans[i], 3))
        shapes.update(_norm(f"memory_encoder.mask_downsampler.encoder.{3 * i + 1}", chans[i + 1]))
    shapes.update(_conv(f"memory_encoder.mask_downsampler.encoder.{3 * (len(chans) - 1)}", d, chans[-1], 1))
    shapes.update(_conv("memory_encoder.pix_feat_proj", d, d, 1))
    for i in range(config.fuser_layers):
        layer = f"memory_encoder.fuser.layers.{i}."
        shapes[layer + "weight"] = (d,)
        shapes[layer + "dwconv.weight"] = (d, 1, 7, 7)
        shapes[layer + "dwconv.bias"] = (d,)
        shapes.update(_norm(layer + "norm", d))
        shapes.update(_linear(layer + "pwconv1", 4 * d, d))
        shapes.update(_linear(layer + "pwconv2", d, 4 * d))
    if m != d:
        shapes.update(_conv("memory_encoder.out_proj", m, d, 1))
    return shapes


def unused_checkpoint_shapes(config: Sam2Config) -> dict[str, tuple[int, ...]]:
    """Full checkpoint names and shapes of SAM-2's video parts for ``config``."""
    d = config.d_model
    shapes: dict[str, tuple[int, ...]] = {
        "maskmem_tpos_enc": (config.num_maskmem, 1, 1, config.mem_dim),
        "no_mem_pos_enc": (1, 1, d),
        "no_obj_ptr": (1, d),
        "mask_downsample.weight": (1, 1, 4, 4),
        "mask_downsample.bias": (1,),
    }
    shapes.update(_memory_attention(config))
    shapes.update(_memory_encoder(config))
    for i in range(3):
        shapes.update(_linear(f"obj_ptr_proj.layers.{i}", d, d))
    return {VISUAL_PREFIX + name: shape for name, shape in shapes.items()}
