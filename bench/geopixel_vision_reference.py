"""Reference arrays for GeoPixel's image side, made by GeoPixel's own code (tests/data/geopixel).

Run it in an environment with GeoPixel's pins (transformers 4.33.2, torch, torchvision, decord),
giving a GeoPixel source folder (mbzuai-oryx/GeoPixel); no GeoPixel code ships with the project:

    python bench/geopixel_vision_reference.py /path/to/GeoPixel [--out tests/data/geopixel]

It runs, unchanged, ``Image_transform`` (model/IXC/ixc_utils.py), ``encode_img`` / ``img2emb``
(model/IXC/modeling_internlm_xcomposer2.py) and ``CLIPVisionTower.forward`` (model/IXC/build_mlp.py)
on the tiles of :func:`pattern_tile` written as PNG files. Only what GeoPixel fetches or hard-codes
is supplied here: the CLIP is a tiny random ``CLIPVisionModel`` saved to a local folder and given
to ``CLIPVisionTower`` as its name (no download), the projector is ``build_vision_projector``'s
Linear-GELU-Linear at tiny widths (GeoPixel hard-codes 4096), and ``vis_processor`` is the
ToTensor + Normalize pair its ``__init__`` builds. Writes ``vision_tiny_weights.npz`` (the tiny
weights under their checkpoint names) and ``vision_reference.npz``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

# name -> (height, width): the tiles the reference covers
TILES = {
    "square1680": (1680, 1680),
    "square300": (300, 300),
    "portrait500x900": (900, 500),
    "wide1200x400": (400, 1200),
    "extreme37x2000": (2000, 37),
    "pixel1x1": (1, 1),
}
TINY_CLIP = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
             "num_attention_heads": 2, "image_size": 560, "patch_size": 14,
             "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
TINY_PROJ = (16, 16)  # vision_proj mid and out widths
HD_NUM = 9
ROW_STEP = 5  # embeddings rows kept: every 5th (all of them for FULL_EMBEDS)
FULL_EMBEDS = "square300"


def pattern_tile(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 test tile: ramps, a product term and blocky steps."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    base = x * 37 + y * 91 + (x * y) // 5 + seed * 53
    chans = [(base + 85 * c * (1 + (x // 17 + y // 13) % 3)) % 256 for c in range(3)]
    return np.stack(chans, axis=-1).astype(np.uint8)


def pixel_sample(arr: np.ndarray) -> np.ndarray:
    """A strided sample of a (..., H, W) array, small enough to store."""
    return np.ascontiguousarray(arr[..., ::37, ::41])


def sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def randomise(module, seed: int) -> None:
    """Seeded weights large enough that every permutation and separator shows in the output."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            elif param.dim() >= 2 and "GN" not in name:
                param.copy_(noise * param.shape[-1] ** -0.5 if param.dim() == 2 else noise * 0.3)
            else:
                param.copy_(noise * 0.5)


def build_geopixel_vision(src: Path, clip_dir: Path, seed: int):
    """GeoPixel's vision part: its CLIPVisionTower, a tiny projector and the two GN parameters."""
    import torch
    from torch import nn
    from torchvision import transforms
    from transformers import CLIPVisionConfig, CLIPVisionModel

    sys.path.insert(0, str(src))
    from model.IXC import build_mlp
    from model.IXC.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM as IXC

    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(str(clip_dir))
    width = 4 * TINY_CLIP["hidden_size"]

    class Vision(nn.Module):
        encode_img = IXC.encode_img  # GeoPixel's own methods, unchanged
        img2emb = IXC.img2emb

        def __init__(self) -> None:
            super().__init__()
            self.plora_glb_GN = nn.Parameter(torch.zeros([1, 1, width]))
            self.plora_sub_GN = nn.Parameter(torch.zeros([1, 1, 1, width]))
            self.vit = build_mlp.CLIPVisionTower(str(clip_dir))
            self.vision_proj = nn.Sequential(nn.Linear(width, TINY_PROJ[0]), nn.GELU(),
                                             nn.Linear(TINY_PROJ[0], TINY_PROJ[1]))
            self.vis_processor = transforms.Compose([
                transforms.ToTensor(),
                transforms.Normalize((0.48145466, 0.4578275, 0.40821073),
                                     (0.26862954, 0.26130258, 0.27577711))])

        @property
        def device(self):
            return self.plora_glb_GN.device

    vision = Vision().eval()
    randomise(vision, seed)
    return vision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("geopixel", type=Path, help="a GeoPixel source folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1]
                        / "tests" / "data" / "geopixel")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    torch.set_num_threads(1)
    sys.path.insert(0, str(args.geopixel))
    from model.IXC.ixc_utils import Image_transform

    args.out.mkdir(parents=True, exist_ok=True)
    ref: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        vision = build_geopixel_vision(args.geopixel, Path(tmp) / "clip", args.seed)
        state = {k: v.detach().numpy() for k, v in vision.state_dict().items()}
        np.savez_compressed(args.out / "vision_tiny_weights.npz", **state)
        seen: list[torch.Tensor] = []
        vision.vit.vision_tower.register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
        for name, (height, width) in TILES.items():
            path = Path(tmp) / f"{name}.png"
            Image.fromarray(pattern_tile(height, width)).save(path)
            padded = np.asarray(Image_transform(Image.open(path), hd_num=HD_NUM))
            pixels = vision.vis_processor(Image_transform(Image.open(path), hd_num=HD_NUM)).numpy()
            seen.clear()
            with torch.no_grad():
                embeds = vision.encode_img(str(path), HD_NUM)[0].numpy()
            clip_in = seen[0].numpy()
            ref[f"{name}/tile_shape"] = np.array([height, width])
            ref[f"{name}/padded_shape"] = np.array(padded.shape)
            ref[f"{name}/padded_sha256"] = np.array(sha256(padded))
            ref[f"{name}/pixels_sha256"] = np.array(sha256(pixels))
            ref[f"{name}/pixels_sample"] = pixel_sample(pixels)
            ref[f"{name}/global_sample"] = pixel_sample(clip_in[0])
            ref[f"{name}/global_sum"] = np.array(clip_in[0].astype(np.float64).sum())
            ref[f"{name}/crops_sha256"] = np.array(sha256(clip_in[1:]))
            ref[f"{name}/n_tokens"] = np.array(embeds.shape[0])
            step = 1 if name == FULL_EMBEDS else ROW_STEP
            ref[f"{name}/embeds_rows"] = np.ascontiguousarray(embeds[::step])
            ref[f"{name}/embeds_row_step"] = np.array(step)
            ref[f"{name}/embeds_abs_sum"] = np.array(np.abs(embeds.astype(np.float64)).sum())
            print(name, padded.shape, embeds.shape, flush=True)
    ref["meta/config"] = np.array(json.dumps({"clip": TINY_CLIP, "proj": TINY_PROJ,
                                              "hd_num": HD_NUM, "seed": args.seed}))
    np.savez_compressed(args.out / "vision_reference.npz", **ref)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
