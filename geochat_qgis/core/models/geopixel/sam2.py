"""GeoPixel's mask head: ``text_hidden_fcs`` + SAM-2 (image encoder, prompt encoder, mask decoder).

What it computes (GeoPixel's ``encode_g_img``, ``get_visual_embs`` and ``evaluate``'s mask loop):
the tile -> :func:`sam2_pixels` -> Hiera + FPN -> stride-4 / stride-8 maps through the decoder's
``conv_s0`` / ``conv_s1``, stride-16 map + ``no_mem_embed`` (= ``image_embed``); each ``[SEG]``
hidden state -> ``text_hidden_fcs`` (Linear H->H, ReLU, Linear H->d) -> one sparse prompt token;
the mask decoder (one call per image, all its ``[SEG]`` at once, image repeated) -> (n, 1, 256,
256) low-res logits -> bilinear to the tile's H x W. Thresholding at 0 is the family parser's.

Parameter names: checkpoint name = :data:`CHECKPOINT_PREFIX` + module name, except inside the
two transformers modules (``image_encoder.trunk`` = Sam2HieraDetModel, ``sam_mask_decoder`` =
Sam2MaskDecoder), whose names differ from GeoPixel's by :data:`NAME_TABLE` (module name pattern ->
checkpoint name). :func:`checkpoint_names` gives the full mapping for a built module;
:func:`load_state` loads full checkpoint names (the video parts of sam2_unused.py skipped);
:func:`checkpoint_tensors` gives a module's tensors under checkpoint names (for the tiny maker).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ...errors import ModelError
from .sam2_config import FCS_PREFIX, VISUAL_PREFIX, Sam2Config
from .sam2_image import Sam2ImageEncoder, sam2_pixels
from .sam2_masks import Sam2PromptEncoder, build_mask_decoder, decoder_inputs, postprocess_masks
from .sam2_unused import is_unused, unused_checkpoint_shapes

CHECKPOINT_PREFIX = {"text_hidden_fcs.": FCS_PREFIX[: -len("text_hidden_fcs.")], "": VISUAL_PREFIX}
MLP3 = r"(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)"
NAME_TABLE: tuple[tuple[str, str], ...] = (
    # transformers Sam2HieraDetModel -> GeoPixel hieradet.Hiera
    (r"^image_encoder\.trunk\.patch_embed\.projection\.", r"image_encoder.trunk.patch_embed.proj."),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.layer_norm([12])\.", r"image_encoder.trunk.blocks.\1.norm\2."),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.mlp\.proj_in\.", r"image_encoder.trunk.blocks.\1.mlp.layers.0."),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.mlp\.proj_out\.", r"image_encoder.trunk.blocks.\1.mlp.layers.1."),
    # transformers Sam2MaskDecoder -> GeoPixel sam/mask_decoder.MaskDecoder + TwoWayTransformer
    (r"^sam_mask_decoder\.transformer\.(.+)\.o_proj\.", r"sam_mask_decoder.transformer.\1.out_proj."),
    (r"^sam_mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.",
     r"sam_mask_decoder.transformer.layers.\1.norm\2."),
    (r"^sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.proj_in\.",
     r"sam_mask_decoder.transformer.layers.\1.mlp.layers.0."),
    (r"^sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.proj_out\.",
     r"sam_mask_decoder.transformer.layers.\1.mlp.layers.1."),
    (r"^sam_mask_decoder\.transformer\.layer_norm_final_attn\.", r"sam_mask_decoder.transformer.norm_final_attn."),
    (r"^sam_mask_decoder\.upscale_conv1\.", r"sam_mask_decoder.output_upscaling.0."),
    (r"^sam_mask_decoder\.upscale_layer_norm\.", r"sam_mask_decoder.output_upscaling.1."),
    (r"^sam_mask_decoder\.upscale_conv2\.", r"sam_mask_decoder.output_upscaling.3."),
    (rf"^sam_mask_decoder\.{MLP3}\.proj_in\.", r"sam_mask_decoder.\1.layers.0."),
    (rf"^sam_mask_decoder\.{MLP3}\.layers\.0\.", r"sam_mask_decoder.\1.layers.1."),
    (rf"^sam_mask_decoder\.{MLP3}\.proj_out\.", r"sam_mask_decoder.\1.layers.2."),
)


@dataclass
class Sam2Features:
    """SAM-2 maps of a batch of tiles: ``image_embed`` (B, d, 64, 64) and ``high_res`` [s0, s1]."""

    image_embed: torch.Tensor
    high_res: list[torch.Tensor]
    sizes: list[tuple[int, int]]


class GeoPixelSam2(nn.Module):
    """``text_hidden_fcs`` + SAM-2's image path, prompt encoder and mask decoder (see module doc)."""

    def __init__(self, config: Sam2Config) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.image_encoder = Sam2ImageEncoder(config)
        self.sam_prompt_encoder = Sam2PromptEncoder(config)
        self.sam_mask_decoder = build_mask_decoder(config)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, d))
        self.text_hidden_fcs = nn.ModuleList([nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size), nn.ReLU(), nn.Linear(config.hidden_size, d))])
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.no_mem_embed.dtype

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 3, S, S) float32 pixels -> (image_embed, [s0, s1]) as ``get_visual_embs``."""
        s0, s1, coarse = self.image_encoder(pixels.to(self.device))
        decoder = self.sam_mask_decoder
        image_embed = coarse + self.no_mem_embed.reshape(1, -1, 1, 1)
        return image_embed, [decoder.conv_s0(s0), decoder.conv_s1(s1)]

    @torch.no_grad()
    def encode_tiles(self, tiles: Sequence[np.ndarray]) -> Sam2Features:
        """SAM-2 features of (H, W, 3) uint8 tiles, encoded in one batch."""
        pixels = torch.stack([sam2_pixels(tile, self.config.image_size) for tile in tiles])
        image_embed, high_res = self.encode_pixels(pixels)
        return Sam2Features(image_embed, high_res, [tuple(tile.shape[:2]) for tile in tiles])

    @torch.no_grad()
    def seg_prompts(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """(n, H) normed [SEG] hidden states -> (n, 1, d) sparse prompt tokens (text_hidden_fcs)."""
        return self.text_hidden_fcs[0](seg_hidden.to(device=self.device, dtype=self.dtype))[:, None, :]

    @torch.no_grad()
    def decode(self, features: Sam2Features, index: int, seg_hidden: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks of tile ``index`` for its (n, H) [SEG] states -> (low-res (n, 1, 256, 256), iou (n, 1),
        float32 logits (n, H, W))."""
        height, width = features.sizes[index]
        sparse = self.seg_prompts(seg_hidden)
        if not len(sparse):
            return sparse.new_zeros((0, 1, 256, 256)), sparse.new_zeros((0, 1)), torch.zeros((0, height, width))
        prompt = self.sam_prompt_encoder
        low_res, iou, _, _ = self.sam_mask_decoder(
            image_embeddings=decoder_inputs(features.image_embed[index:index + 1], self.dtype),
            image_positional_embeddings=prompt.dense_pe().to(self.dtype),
            sparse_prompt_embeddings=sparse[None],
            dense_prompt_embeddings=prompt.dense_embeddings(),
            multimask_output=False,
            high_resolution_features=[level[index:index + 1] for level in features.high_res])
        low_res, iou = low_res[0], iou[0]
        return low_res, iou, postprocess_masks(low_res, height, width)

    @torch.no_grad()
    def mask_logits(self, tile: np.ndarray, seg_hidden: torch.Tensor) -> torch.Tensor:
        """(n, H, W) float32 mask logits of one tile for its (n, hidden) [SEG] states."""
        return self.decode(self.encode_tiles([tile]), 0, seg_hidden)[2].cpu()


def checkpoint_name(module_name: str) -> str:
    """The full checkpoint name of one of :class:`GeoPixelSam2`'s state_dict names."""
    for pattern, replacement in NAME_TABLE:
        if re.match(pattern, module_name):
            module_name = re.sub(pattern, replacement, module_name)
            break
    for prefix, checkpoint_prefix in CHECKPOINT_PREFIX.items():
        if module_name.startswith(prefix):
            return checkpoint_prefix + module_name
    raise AssertionError(module_name)  # "" matches every name


def checkpoint_names(module: nn.Module) -> dict[str, str]:
    """Full checkpoint name -> module state_dict name, for every tensor of ``module``."""
    return {checkpoint_name(name): name for name in module.state_dict()}


def checkpoint_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s tensors under their full checkpoint names."""
    return {checkpoint_name(name): tensor for name, tensor in module.state_dict().items()}


def is_sam2_name(name: str) -> bool:
    """True for the checkpoint names this part owns (SAM-2, incl. unused video parts, and text_hidden_fcs)."""
    return name.startswith((VISUAL_PREFIX, FCS_PREFIX))


def load_state(module: GeoPixelSam2, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load full-name checkpoint ``tensors`` (only this part's names; video parts skipped unread) into
    ``module`` (built on ``meta``: the tensors are assigned; allocated: copied in its dtype).

    A name of this part the module lacks, one it needs that is absent, or a shape that differs is
    a ModelError naming the tensor."""
    names = checkpoint_names(module)
    wanted = [name for name in tensors if not is_unused(name)]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise ModelError(f"The GeoPixel checkpoint's tensor {unknown[0]!r} is not part of SAM-2 as this "
                         "version builds it: the checkpoint is not GeoPixel's layout.")
    missing = sorted(set(names) - set(wanted))
    if missing:
        more = f" and {len(missing) - 1} more SAM-2 tensors" if len(missing) > 1 else ""
        raise ModelError(f"The GeoPixel checkpoint lacks {missing[0]!r}{more}: it is incomplete; "
                         "download it again.")
    own = module.state_dict()
    state = {}
    for name in wanted:
        tensor, target = tensors[name], own[names[name]]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ModelError(f"The GeoPixel checkpoint's {name!r} is {tuple(tensor.shape)}, SAM-2 here expects "
                             f"{tuple(target.shape)}: the sizes were read wrongly or the checkpoint is damaged.")
        state[names[name]] = tensor
    module.load_state_dict(state, strict=True, assign=any(t.is_meta for t in own.values()))


def expected_shapes(config: Sam2Config) -> dict[str, tuple[int, ...]]:
    """Full checkpoint names and shapes of the tensors :class:`GeoPixelSam2` loads (built on meta)."""
    with torch.device("meta"):
        module = GeoPixelSam2(config)
    return {name: tuple(t.shape) for name, t in checkpoint_tensors(module).items()}


def checkpoint_shapes(config: Sam2Config) -> dict[str, tuple[int, ...]]:
    """Every SAM-2 / text_hidden_fcs tensor of a checkpoint of these sizes, the unused video parts too."""
    return {**expected_shapes(config), **unused_checkpoint_shapes(config)}
