"""GeoPixel's image side (IXC-2.5): CLIP ViT-L/14 at 560 px, 2x2 merge, separators, projector.

What it computes, as GeoPixel's ``encode_img`` -> ``img2emb`` -> ``CLIPVisionTower.forward`` ->
``vision_proj`` do for one image:

1. The HD-transformed image (:mod:`.hd_transform`: (3, H, W) float32, H and W multiples of 560).
2. CLIP's input batch: first the global view (the whole normalised image bicubic-interpolated to
   560 x 560 with ``F.interpolate``, ``align_corners=False``, no antialias), then the
   ``rows x cols`` crops of 560 px in row-major order.
3. CLIP: the last encoder layer's output (no ``post_layernorm``), CLS dropped: 40 x 40 patches.
4. Each 2 x 2 block of patches becomes one 4C token, its C-wide parts in the order (top-left,
   top-right, bottom-left, bottom-right): 20 x 20 tokens per crop.
5. Sequence: the global view's 20 rows of 20 tokens, each row followed by ``plora_sub_GN``
   (GeoPixel uses sub_GN there too); then ``plora_glb_GN``; then the crops stitched into one
   ``20 rows x 20 cols`` token grid, each of its rows followed by ``plora_sub_GN``:
   ``(rows*cols + 1) * 400 + 1 + (rows + 1) * 20`` tokens.
6. The ``mlp2x_gelu`` projector: Linear(4C, mid), exact GELU, Linear(mid, out).

Parameter names are the checkpoint's own names, unchanged (no prefix removed):
``vit.vision_tower.vision_model.<CLIP>`` (CLIPVisionModel's parameters as transformers 4.33
named them: ``embeddings.class_embedding``, ``embeddings.patch_embedding.weight``,
``embeddings.position_embedding.weight``, ``pre_layrnorm.*``, ``encoder.layers.N.{self_attn.
{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}.*``, ``post_layernorm.*``),
``vision_proj.0.{weight,bias}``, ``vision_proj.2.{weight,bias}``, ``plora_glb_GN`` (1, 1, 4C),
``plora_sub_GN`` (1, 1, 1, 4C). A checkpoint's ``...embeddings.position_ids`` (a non-persistent
buffer) is ignored. The IXC CLIP is 560 px natively (1601 position embeddings): nothing is
interpolated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from ...errors import ModelError
from .hd_transform import CROP, DEFAULT_HD_NUM, MERGED_SIDE, crop_grid_token_count, hd_transform

CLIP_PREFIX = "vit.vision_tower.vision_model."
VISION_PREFIXES = ("vit.", "vision_proj.", "plora_glb_GN", "plora_sub_GN")
_LAYER_KEY = re.compile(re.escape(CLIP_PREFIX) + r"encoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class IXCVisionConfig:
    """Sizes of GeoPixel's CLIP tower and projector (defaults: the published 7B)."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 560
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    proj_mid: int = 4096
    proj_out: int = 4096
    # "eager" is transformers 4.33's CLIP attention: GeoPixel's f32 numbers bit for bit on the CPU;
    # "sdpa" is within 1e-5 of them and needs far less memory (10 crops x 1601 tokens x heads)
    attn_implementation: str = "sdpa"

    @property
    def merged_size(self) -> int:
        """Width of a 2x2-merged token, the separators and the projector's input (4 C)."""
        return 4 * self.hidden_size

    @classmethod
    def from_checkpoint(cls, hf_config: Mapping[str, Any],
                        shapes: Mapping[str, tuple[int, ...]]) -> "IXCVisionConfig":
        """Sizes from the tensors (full checkpoint names); heads and activation from
        ``hf_config['vision_config']`` when given, else head width 64 and quick_gelu (IXC's CLIP)."""
        def shape(name: str) -> tuple[int, ...]:
            if name not in shapes:
                raise ModelError(f"The checkpoint has no tensor '{name}': it is not a GeoPixel "
                                 "checkpoint in the published layout. Download it again.")
            return tuple(shapes[name])

        hidden, _, patch, _ = shape(CLIP_PREFIX + "embeddings.patch_embedding.weight")
        n_pos = shape(CLIP_PREFIX + "embeddings.position_embedding.weight")[0]
        grid = int(round((n_pos - 1) ** 0.5))
        if grid * grid != n_pos - 1:
            raise ModelError(f"CLIP position embeddings have {n_pos} rows, not 1 + a square.")
        layers = {int(m.group(1)) for k in shapes if (m := _LAYER_KEY.match(k))}
        if not layers or layers != set(range(len(layers))):
            raise ModelError("The checkpoint's CLIP encoder layers are missing or not numbered "
                             f"0..n-1 (found {sorted(layers)}).")
        vcfg = dict(hf_config.get("vision_config") or {})
        heads = int(vcfg.get("num_attention_heads") or 0)
        if not heads:
            if hidden % 64:
                raise ModelError(f"CLIP width {hidden} is not a multiple of 64 and config.json "
                                 "gives no vision_config.num_attention_heads.")
            heads = hidden // 64
        mid, proj_in = shape("vision_proj.0.weight")
        out = shape("vision_proj.2.weight")[0]
        cfg = cls(
            hidden_size=hidden, num_layers=len(layers), num_heads=heads,
            intermediate_size=shape(CLIP_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0],
            image_size=grid * patch, patch_size=patch,
            hidden_act=str(vcfg.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(vcfg.get("layer_norm_eps", 1e-5)),
            proj_mid=mid, proj_out=out)
        cfg.check(shapes)
        return cfg

    def check(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """ModelError unless the tower fits GeoPixel's fixed 560 px / 40 x 40 layout and 4C widths."""
        if self.image_size != CROP or self.image_size // self.patch_size != 2 * MERGED_SIDE:
            raise ModelError(f"GeoPixel's CLIP must see {CROP} px crops as 40 x 40 patches; this "
                             f"one is {self.image_size} px with {self.patch_size} px patches.")
        want = {"vision_proj.0.weight": (self.proj_mid, self.merged_size),
                "plora_glb_GN": (1, 1, self.merged_size),
                "plora_sub_GN": (1, 1, 1, self.merged_size)}
        for name, expected in want.items():
            if name in shapes and tuple(shapes[name]) != expected:
                raise ModelError(f"Checkpoint tensor '{name}' has shape {tuple(shapes[name])}, "
                                 f"expected {expected} (4 x the CLIP width {self.hidden_size}).")

    def clip_config(self) -> CLIPVisionConfig:
        """The transformers CLIPVisionConfig of the tower."""
        cfg = CLIPVisionConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            image_size=self.image_size, patch_size=self.patch_size, hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps, attention_dropout=0.0)
        cfg._attn_implementation = self.attn_implementation
        return cfg


def global_view(pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) normalised image -> (1, 3, 560, 560), as GeoPixel interpolates it (float32)."""
    return F.interpolate(pixels.float(), size=(CROP, CROP), mode="bicubic", align_corners=False)


def crops(pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) -> (rows * cols, 3, 560, 560), row-major."""
    _, c, h, w = pixels.shape
    rows, cols = h // CROP, w // CROP
    grid = pixels.reshape(c, rows, CROP, cols, CROP).permute(1, 3, 0, 2, 4)
    return grid.reshape(rows * cols, c, CROP, CROP)


def merge_2x2(features: torch.Tensor) -> torch.Tensor:
    """(B, 1600, C) patch features -> (B, 20, 20, 4C): each 2x2 block's C-wide parts in row order."""
    b, n, c = features.shape
    side = MERGED_SIDE
    blocks = features.reshape(b, side, 2, side, 2, c).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(b, side, side, 4 * c)


def arrange(glb: torch.Tensor, subs: torch.Tensor, rows: int, cols: int,
            glb_gn: torch.Tensor, sub_gn: torch.Tensor) -> torch.Tensor:
    """Merged global (1, 20, 20, 4C) and crops (rows*cols, 20, 20, 4C) -> (n_tokens, 4C)."""
    side, width = MERGED_SIDE, glb.shape[-1]
    sep = sub_gn.reshape(1, 1, width).to(glb.dtype)
    glb_rows = torch.cat([glb[0], sep.expand(side, 1, width)], dim=1).reshape(-1, width)
    grid = subs.reshape(rows, cols, side, side, width).permute(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * side, cols * side, width)
    sub_rows = torch.cat([grid, sep.expand(rows * side, 1, width)], dim=1).reshape(-1, width)
    return torch.cat([glb_rows, glb_gn.reshape(1, width).to(glb.dtype), sub_rows], dim=0)


class IXCVision(nn.Module):
    """GeoPixel's CLIP tower, separators and projector: an RGB tile -> its image embeddings."""

    def __init__(self, config: IXCVisionConfig) -> None:
        super().__init__()
        self.config = config
        clip = CLIPVisionModel(config.clip_config())
        self.vit = nn.ModuleDict({"vision_tower": nn.ModuleDict({"vision_model": clip})})
        width = config.merged_size
        self.vision_proj = nn.Sequential(nn.Linear(width, config.proj_mid), nn.GELU(),
                                         nn.Linear(config.proj_mid, config.proj_out))
        self.plora_glb_GN = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.plora_sub_GN = nn.Parameter(torch.randn(1, 1, 1, width) * 0.02)

    @property
    def clip(self) -> CLIPVisionModel:
        """The transformers CLIPVisionModel inside ``vit.vision_tower.vision_model``."""
        return self.vit["vision_tower"]["vision_model"]

    @property
    def device(self) -> torch.device:
        return self.plora_glb_GN.device

    @property
    def dtype(self) -> torch.dtype:
        return self.plora_glb_GN.dtype

    def reset_buffers(self) -> None:
        """Rebuild CLIP's non-persistent ``position_ids`` on the parameters' device (after meta)."""
        emb = self.clip.embeddings
        emb.position_ids = torch.arange(emb.num_positions, device=self.device).expand(1, -1)

    def clip_features(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, 560, 560) -> (B, 1600, C): last layer, no post_layernorm, CLS dropped."""
        out = self.clip(pixel_values=batch.to(device=self.device, dtype=self.dtype))
        return out.last_hidden_state[:, 1:]

    def embed_pixels(self, pixels: Sequence[torch.Tensor],
                     crop_batch: int | None = None) -> list[torch.Tensor]:
        """HD-transformed (3, H, W) images -> their (n_tokens, proj_out) embeddings; CLIP sees all
        crops of all images at once, or ``crop_batch`` crops at a time (less memory)."""
        inputs, grids = [], []
        for image in pixels:
            img = image.unsqueeze(0).to(self.device)
            sub = crops(img)
            inputs += [global_view(img).to(sub.dtype), sub]
            grids.append((image.shape[1] // CROP, image.shape[2] // CROP))
        batch = torch.cat(inputs, dim=0)
        step = crop_batch or batch.shape[0]
        merged = merge_2x2(torch.cat([self.clip_features(batch[i:i + step])
                                      for i in range(0, batch.shape[0], step)], dim=0))
        out, start = [], 0
        for rows, cols in grids:
            n = rows * cols
            seq = arrange(merged[start:start + 1], merged[start + 1:start + 1 + n], rows, cols,
                          self.plora_glb_GN, self.plora_sub_GN)
            assert seq.shape[0] == crop_grid_token_count(rows, cols)
            out.append(self.vision_proj(seq))
            start += 1 + n
        return out

    @torch.no_grad()
    def embed_many(self, tiles: Sequence[np.ndarray], hd_num: int = DEFAULT_HD_NUM,
                   crop_batch: int | None = None) -> list[torch.Tensor]:
        """(H, W, 3) uint8 tiles -> each one's (n_tokens, proj_out) image embeddings."""
        return self.embed_pixels([torch.from_numpy(hd_transform(t, hd_num)) for t in tiles],
                                 crop_batch)

    @torch.no_grad()
    def embed(self, image_uint8: np.ndarray, hd_num: int = DEFAULT_HD_NUM) -> torch.Tensor:
        """An (H, W, 3) uint8 tile -> (n_tokens, proj_out) image embeddings in GeoPixel's order."""
        return self.embed_many([image_uint8], hd_num)[0]


def load_state(module: IXCVision, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load the vision part from full checkpoint names (other parts' keys are skipped).

    Missing, unexpected or mis-shaped vision keys are a ModelError naming the key; tensors are
    assigned as given (dtype and device), so a module built on ``meta`` becomes real.
    """
    own = dict(module.state_dict())
    picked = {k: v for k, v in tensors.items()
              if k.startswith(VISION_PREFIXES) and not k.endswith("embeddings.position_ids")}
    for key in picked:
        if key not in own:
            raise ModelError(f"Unexpected vision tensor '{key}' in the checkpoint: it does not "
                             "match GeoPixel's CLIP / projector layout.")
        if tuple(picked[key].shape) != tuple(own[key].shape):
            raise ModelError(f"Vision tensor '{key}' has shape {tuple(picked[key].shape)}, "
                             f"expected {tuple(own[key].shape)}.")
    missing = sorted(set(own) - set(picked))
    if missing:
        raise ModelError(f"The checkpoint lacks vision tensor '{missing[0]}' "
                         f"({len(missing)} missing): download the model again.")
    module.load_state_dict(picked, strict=True, assign=True)
    module.reset_buffers()
