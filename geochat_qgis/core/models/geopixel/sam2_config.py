"""Sizes of GeoPixel's SAM-2 part (Hiera image encoder, FPN neck, SAM heads, text_hidden_fcs).

GeoPixel builds SAM-2 from ``sam2_hiera_l.yaml`` and its own ``_build_sam_heads``; the published
checkpoint's config.json does not describe it. :meth:`Sam2Config.from_checkpoint` reads every
size the tensors show (Hiera width and blocks per stage, the positional-embedding grids, the neck
width, the decoder's MLP sizes, the memory parts' widths) and takes what no shape shows from one
rule (:func:`hiera_rules`), the same rule :meth:`Sam2Config.for_sizes` applies when the tiny
maker picks sizes, so a tiny checkpoint and the Hiera-L one load by the same path.

Not visible in any shape (GeoPixel's values, ``sam2_hiera_l.yaml`` / ``sam2_base.py``):
- Hiera heads: 2 in the first stage, doubled at each stage (``num_heads``, ``head_mul``);
- global-attention blocks: Hiera-L's (23, 33, 43): the last block of stage 3 and every 10th
  before it, three at most, within stage 3 (a shorter stage 3 has fewer: 1/2/5/1 blocks -> (7,));
- window sizes after the first stage: (4, 16, 8) (the first is ``pos_embed_window``'s side);
- three query-pooling stages with stride 2; FPN top-down levels (2, 3), nearest upsampling,
  the lowest level dropped (``scalp`` 1); image size 1024 (GeoPixel hard-codes 256/128/64 maps);
- the mask decoder's 8 heads and attention downsampling 2.
This module imports no torch, so a separate environment (the GeoPixel reference) can use it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ...errors import ModelError

VISUAL_PREFIX = "model.visual_model."
FCS_PREFIX = "model.text_hidden_fcs."
TRUNK = VISUAL_PREFIX + "image_encoder.trunk."
DECODER = VISUAL_PREFIX + "sam_mask_decoder."

HIERA_L_STAGES = (2, 6, 36, 4)
GLOBAL_SPACING, GLOBAL_COUNT = 10, 3  # Hiera-L: blocks 43, 33, 23 (stage 3 = blocks 8..43)
HIERA_L_WINDOWS = (8, 4, 16, 8)
TINY_SIZES = {"embed_dim": 8, "stages": (1, 2, 5, 1), "d_model": 32}


def global_blocks(stages: Sequence[int]) -> tuple[int, ...]:
    """Hiera-L's global-attention rule for ``stages``: stage 3's last block and every 10th before it."""
    start, last = stages[0] + stages[1], sum(stages[:3]) - 1
    return tuple(sorted(b for b in range(last, last - GLOBAL_SPACING * GLOBAL_COUNT, -GLOBAL_SPACING) if b >= start))


def hiera_rules(stages: Sequence[int], first_window: int) -> dict:
    """The sizes no tensor shows, for a trunk with these stages (see the module docstring)."""
    return {"num_heads": 2, "global_att_blocks": global_blocks(stages),
            "window_spec": (first_window,) + HIERA_L_WINDOWS[1:], "q_pool": 3}


@dataclass(frozen=True)
class Sam2Config:
    """GeoPixel's SAM-2 sizes; the defaults are Hiera-L with a 256-wide neck and SAM heads."""

    hidden_size: int = 4096  # the language model's width (text_hidden_fcs input)
    embed_dim: int = 144
    num_heads: int = 2
    stages: tuple[int, ...] = HIERA_L_STAGES
    global_att_blocks: tuple[int, ...] = (23, 33, 43)
    window_spec: tuple[int, ...] = HIERA_L_WINDOWS
    window_pos_embed_size: tuple[int, int] = (7, 7)
    q_pool: int = 3
    d_model: int = 256  # neck width = SAM prompt width = text_hidden_fcs output (out_dim)
    image_size: int = 1024
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    scalp: int = 1
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden: int = 256
    num_multimask_outputs: int = 3
    mask_in_chans: int = 16
    stability_delta: float = 0.05
    stability_thresh: float = 0.98
    # SAM-2's video parts: stored in the checkpoint, never run (sam2_unused.py)
    mem_dim: int = 64
    mem_layers: int = 4
    mem_ffn: int = 2048
    num_maskmem: int = 7
    fuser_layers: int = 2

    def __post_init__(self) -> None:
        if len(self.stages) != 4 or min(self.stages) < 1:
            raise ModelError(f"SAM-2's Hiera trunk needs 4 stages of at least one block (got {self.stages}).")
        if self.embed_dim % self.num_heads or self.d_model % (2 * self.decoder_heads):
            raise ModelError(f"SAM-2 widths do not divide into heads (Hiera {self.embed_dim} / {self.num_heads}, "
                             f"SAM {self.d_model} / {self.decoder_heads}): the checkpoint is not GeoPixel's layout.")

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2 ** i for i in range(4))

    @property
    def stage_heads(self) -> tuple[int, ...]:
        return tuple(self.num_heads * 2 ** i for i in range(4))

    @property
    def feature_sizes(self) -> tuple[int, ...]:
        """Sides of the three maps the decoder sees: stride 4, 8, 16 (256, 128, 64 at 1024 px)."""
        return tuple(self.image_size // s for s in (4, 8, 16))

    @classmethod
    def for_sizes(cls, hidden_size: int, *, embed_dim: int = 144, stages: Sequence[int] = HIERA_L_STAGES,
                  d_model: int = 256, window_pos_embed_size: Sequence[int] = (7, 7), first_window: int = 8,
                  **sizes) -> "Sam2Config":
        """The config of a checkpoint with these sizes, unseen sizes by :func:`hiera_rules`."""
        stages = tuple(int(s) for s in stages)
        return cls(hidden_size=hidden_size, embed_dim=embed_dim, stages=stages, d_model=d_model,
                   window_pos_embed_size=tuple(window_pos_embed_size), **hiera_rules(stages, first_window), **sizes)

    @classmethod
    def tiny(cls, hidden_size: int) -> "Sam2Config":
        """The tiny test model's SAM-2 (TINY_SIZES: 8-wide Hiera of 1/2/5/1 blocks, 32-wide heads)."""
        return cls.for_sizes(hidden_size, **TINY_SIZES)

    @classmethod
    def from_checkpoint(cls, hf_config: Mapping, shapes: Mapping[str, Sequence[int]]) -> "Sam2Config":
        """Sizes from the tensors' shapes (full checkpoint names) and config.json (ModelError if absent)."""
        def shape(name: str) -> tuple[int, ...]:
            if name not in shapes:
                raise ModelError(f"The GeoPixel checkpoint has no tensor {name!r}: it is incomplete or not "
                                 "GeoPixel's layout; download it again.")
            return tuple(int(n) for n in shapes[name])

        fc_in, hidden = shape(FCS_PREFIX + "0.0.weight")
        out_dim, _ = shape(FCS_PREFIX + "0.2.weight")
        configured = hf_config.get("hidden_size", hidden)
        if fc_in != hidden or configured != hidden:
            raise ModelError(f"text_hidden_fcs is {fc_in} x {hidden} but the language model is {configured} "
                             "wide: the checkpoint's parts do not belong together.")
        embed_dim = shape(TRUNK + "patch_embed.proj.weight")[0]
        stages = _stages(shapes)
        first_window = shape(TRUNK + "pos_embed_window")[-1]
        d_model = shape(VISUAL_PREFIX + "image_encoder.neck.convs.0.conv.weight")[0]
        if out_dim != d_model or shape(VISUAL_PREFIX + "no_mem_embed")[-1] != d_model:
            raise ModelError(f"text_hidden_fcs gives {out_dim}-wide prompts but SAM-2 is {d_model} wide "
                             "(config out_dim): the checkpoint's parts do not belong together.")
        sizes = {
            "decoder_depth": _count(shapes, DECODER + "transformer.layers."),
            "decoder_mlp_dim": shape(DECODER + "transformer.layers.0.mlp.layers.0.weight")[0],
            "iou_head_hidden": shape(DECODER + "iou_prediction_head.layers.0.weight")[0],
            "num_multimask_outputs": shape(DECODER + "mask_tokens.weight")[0] - 1,
            "mask_in_chans": shape(VISUAL_PREFIX + "sam_prompt_encoder.mask_downscaling.3.weight")[0],
        }
        sizes.update(_memory_sizes(shapes))
        config = cls.for_sizes(hidden, embed_dim=embed_dim, stages=stages, d_model=d_model,
                               window_pos_embed_size=shape(TRUNK + "pos_embed")[2:], first_window=first_window,
                               **sizes)
        for i, dim in enumerate(config.stage_dims):
            block = sum(config.stages[:i + 1]) - 1
            if shape(TRUNK + f"blocks.{block}.attn.qkv.weight")[0] != 3 * dim:
                raise ModelError(f"Hiera block {block} is not {dim} wide as stage {i + 1} should be: the "
                                 "checkpoint is not SAM-2's layout.")
        return config


def _count(shapes: Mapping[str, Sequence[int]], prefix: str) -> int:
    """How many numbered children ``prefix``N. the checkpoint holds (max N + 1; 0 if none)."""
    match = re.compile(re.escape(prefix) + r"(\d+)\.").match
    found = {int(m.group(1)) for m in map(match, shapes) if m}
    return max(found) + 1 if found else 0


def _stages(shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    """Blocks per stage: a block with a ``proj`` (a width change) opens a stage."""
    depth = _count(shapes, TRUNK + "blocks.")
    if not depth:
        raise ModelError("The GeoPixel checkpoint holds no SAM-2 Hiera blocks (model.visual_model.image_encoder."
                         "trunk.blocks.*): it is incomplete or not GeoPixel's layout.")
    starts = [0] + [i for i in range(1, depth) if TRUNK + f"blocks.{i}.proj.weight" in shapes]
    return tuple(b - a for a, b in zip(starts, starts[1:] + [depth]))


def _memory_sizes(shapes: Mapping[str, Sequence[int]]) -> dict:
    """The video parts' sizes where the checkpoint holds them (only to name them; never run)."""
    sizes: dict = {}
    tpos: Optional[Sequence[int]] = shapes.get(VISUAL_PREFIX + "maskmem_tpos_enc")
    if tpos is not None:
        sizes["num_maskmem"], sizes["mem_dim"] = int(tpos[0]), int(tpos[-1])
    ffn = shapes.get(VISUAL_PREFIX + "memory_attention.layers.0.linear1.weight")
    if ffn is not None:
        sizes["mem_ffn"] = int(ffn[0])
    layers = _count(shapes, VISUAL_PREFIX + "memory_attention.layers.")
    if layers:
        sizes["mem_layers"] = layers
    fusers = _count(shapes, VISUAL_PREFIX + "memory_encoder.fuser.layers.")
    if fusers:
        sizes["fuser_layers"] = fusers
    return sizes
