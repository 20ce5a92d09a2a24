"""SAM-2's prompt side and mask decoder as GeoPixel's ``evaluate`` runs them.

- :class:`Sam2PromptEncoder`: GeoPixel's prompt is one sparse token per ``[SEG]`` (the
  ``text_hidden_fcs`` output, no padding point: GeoPixel's ``text_embeds`` argument is
  concatenated to an empty point list) and the dense ``no_mask_embed``. Its positional grid
  (:meth:`Sam2PromptEncoder.dense_pe`) is GeoPixel's: built in bfloat16 (``torch.ones(...,
  dtype=bfloat16).cumsum``), multiplied by the random-Fourier matrix and passed through sin / cos
  in bfloat16, unlike SAM-2 and transformers (float32). The point / box / mask-input weights are
  held (the checkpoint has them) but GeoPixel never uses them.
- the decoder is transformers' ``Sam2MaskDecoder`` (two-way transformer, high-resolution skip
  features, dynamic multimask via stability in eval, as GeoPixel's ``mask_decoder.py``).
- :func:`decoder_inputs` applies GeoPixel's cast of ``image_embed`` to bfloat16 (kept in any
  model dtype: a float32 model sees the bf16-rounded map, as GeoPixel's float32 run does).
- :func:`postprocess_masks`: float32, bilinear upsampling to the tile (``align_corners=False``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sam2_config import Sam2Config


class ChannelNorm(nn.Module):
    """SAM's LayerNorm2d parameters (the unused mask-input path holds two)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))


class RandomFourier(nn.Module):
    """Holder of SAM's ``positional_encoding_gaussian_matrix`` (2, d/2) (a buffer in the checkpoint)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, dim // 2))


class Sam2PromptEncoder(nn.Module):
    """GeoPixel's use of SAM-2's prompt encoder: text tokens, no mask, its bf16 positional grid."""

    def __init__(self, config: Sam2Config) -> None:
        super().__init__()
        d, chans = config.d_model, config.mask_in_chans
        self.grid = config.image_size // 16
        self.pe_layer = RandomFourier(d)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, d) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, d)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, chans // 4, kernel_size=2, stride=2), ChannelNorm(chans // 4), nn.GELU(),
            nn.Conv2d(chans // 4, chans, kernel_size=2, stride=2), ChannelNorm(chans), nn.GELU(),
            nn.Conv2d(chans, d, kernel_size=1))
        self.no_mask_embed = nn.Embedding(1, d)

    def dense_pe(self) -> torch.Tensor:
        """(1, d, g, g) positional grid in bfloat16, computed as GeoPixel's ``get_dense_pe``."""
        matrix = self.pe_layer.positional_encoding_gaussian_matrix
        ones = torch.ones((self.grid, self.grid), device=matrix.device, dtype=torch.bfloat16)
        y = (ones.cumsum(dim=0) - 0.5) / self.grid
        x = (ones.cumsum(dim=1) - 0.5) / self.grid
        coords = 2 * torch.stack([x, y], dim=-1) - 1
        coords = 2 * math.pi * (coords @ matrix.to(torch.bfloat16))
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1).permute(2, 0, 1)[None]

    def dense_embeddings(self) -> torch.Tensor:
        """(1, d, g, g) dense prompt: ``no_mask_embed`` everywhere."""
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, self.grid, self.grid)


def mask_decoder_config(config: Sam2Config):
    """transformers' Sam2MaskDecoderConfig for GeoPixel's heads (dynamic multimask on, SDPA)."""
    from transformers.models.sam2.configuration_sam2 import Sam2MaskDecoderConfig

    decoder = Sam2MaskDecoderConfig(
        hidden_size=config.d_model, hidden_act="gelu", mlp_dim=config.decoder_mlp_dim,
        num_hidden_layers=config.decoder_depth, num_attention_heads=config.decoder_heads,
        attention_downsample_rate=2, num_multimask_outputs=config.num_multimask_outputs, iou_head_depth=3,
        iou_head_hidden_dim=config.iou_head_hidden, dynamic_multimask_via_stability=True,
        dynamic_multimask_stability_delta=config.stability_delta,
        dynamic_multimask_stability_thresh=config.stability_thresh)
    decoder._attn_implementation = "sdpa"
    return decoder


def build_mask_decoder(config: Sam2Config) -> nn.Module:
    """transformers' Sam2MaskDecoder sized for ``config``."""
    from transformers.models.sam2.modeling_sam2 import Sam2MaskDecoder

    return Sam2MaskDecoder(mask_decoder_config(config))


def decoder_inputs(image_embed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """GeoPixel's ``image_embed.to(torch.bfloat16)`` before the decoder, in the model's ``dtype``."""
    return image_embed.to(torch.bfloat16).to(dtype)


def postprocess_masks(low_res: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, 1, 256, 256) low-res logits -> (n, height, width) float32 logits (SAM2Transforms)."""
    masks = F.interpolate(low_res.float(), (height, width), mode="bilinear", align_corners=False)
    return masks[:, 0]
