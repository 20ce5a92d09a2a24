"""SAM-2's image side as GeoPixel runs it: 1024 px transform, Hiera trunk, FPN neck.

- :func:`sam2_pixels`: GeoPixel's ``SAM2Transforms`` on a tile (torchvision ToTensor, Resize to
  1024 x 1024, Normalize) in torch alone: uint8 / 255, ``F.interpolate`` bilinear with
  ``antialias=True`` and ``align_corners=False`` (what torchvision's Resize does on a float
  tensor), then ImageNet mean / std. No aspect ratio is kept: GeoPixel squashes the tile.
- :class:`Sam2ImageEncoder`: the Hiera trunk is transformers' ``Sam2HieraDetModel`` (same
  computation as GeoPixel's ``hieradet.py``; names differ, see sam2.py's table); the FPN neck is
  our own because GeoPixel's keeps the top-down sum in float32 (it upsamples in float32 and never
  casts back), so a bf16 model's stride-16 map is rounded once, when GeoPixel casts
  ``image_embed`` to bf16, where transformers' neck rounds it already in the neck.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...vision.preprocess import tile_rgb
from .sam2_config import Sam2Config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sam2_pixels(tile: np.ndarray, size: int = 1024) -> torch.Tensor:
    """(3, size, size) float32 input of GeoPixel's SAM-2 for an (H, W, 3) uint8 tile."""
    tile = tile_rgb(tile)
    x = torch.from_numpy(tile).permute(2, 0, 1).to(torch.float32).div(255)
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=x.dtype).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def hiera_config(config: Sam2Config):
    """transformers' Sam2HieraDetConfig for GeoPixel's trunk (SDPA attention, as GeoPixel)."""
    from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig

    hiera = Sam2HieraDetConfig(
        hidden_size=config.embed_dim, num_attention_heads=config.num_heads, num_channels=3,
        image_size=[config.image_size, config.image_size], patch_kernel_size=[7, 7], patch_stride=[4, 4],
        patch_padding=[3, 3], query_stride=[2, 2],
        window_positional_embedding_background_size=list(config.window_pos_embed_size),
        num_query_pool_stages=config.q_pool, blocks_per_stage=list(config.stages),
        embed_dim_per_stage=list(config.stage_dims), num_attention_heads_per_stage=list(config.stage_heads),
        window_size_per_stage=list(config.window_spec), global_attention_blocks=list(config.global_att_blocks),
        mlp_ratio=4.0, hidden_act="gelu", layer_norm_eps=1e-6)
    hiera._attn_implementation = "sdpa"
    return hiera


class FpnNeck(nn.Module):
    """SAM-2's FPN neck: 1x1 lateral convs, nearest top-down on the configured levels (float32)."""

    def __init__(self, config: Sam2Config) -> None:
        super().__init__()
        self.top_down_levels = tuple(config.fpn_top_down_levels)
        self.convs = nn.ModuleList()
        for dim in reversed(config.stage_dims):  # lowest resolution first, as the checkpoint
            lateral = nn.Sequential()
            lateral.add_module("conv", nn.Conv2d(dim, config.d_model, kernel_size=1))
            self.convs.append(lateral)

    def forward(self, stages: list[torch.Tensor]) -> list[torch.Tensor]:
        """Stage maps (B, C, H, W), highest resolution first -> the neck's maps in the same order."""
        n = len(self.convs) - 1
        coarse_first: list[torch.Tensor] = []
        for i in range(n, -1, -1):
            lateral = self.convs[n - i](stages[i])
            if i in self.top_down_levels and coarse_first:
                top_down = F.interpolate(coarse_first[-1].to(torch.float32), scale_factor=2.0, mode="nearest")
                lateral = lateral + top_down  # float32 even in a bf16 model, as GeoPixel
            coarse_first.append(lateral)
        return coarse_first[::-1]


class Sam2ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck; returns the maps GeoPixel keeps (``scalp`` drops the coarsest)."""

    def __init__(self, config: Sam2Config) -> None:
        super().__init__()
        from transformers.models.sam2.modeling_sam2 import Sam2HieraDetModel

        self.scalp = config.scalp
        self.trunk = Sam2HieraDetModel(hiera_config(config))
        self.neck = FpnNeck(config)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) normalised pixels -> feature maps at strides 4, 8, 16 (d_model channels)."""
        hidden = self.trunk(pixels).intermediate_hidden_states
        maps = self.neck([h.permute(0, 3, 1, 2) for h in hidden])
        return maps[: len(maps) - self.scalp] if self.scalp else maps
