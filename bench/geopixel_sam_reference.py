"""Reference arrays of GeoPixel's own SAM-2 mask path, for tests/unit/test_geopixel_sam2.py.

Run in an environment that runs GeoPixel's code (torch, torchvision, hydra-core, transformers
4.33, GeoPixel's requirements), with a GeoPixel source folder (mbzuai-oryx/GeoPixel) as argument:

    python bench/geopixel_sam_reference.py /path/to/GeoPixel tests/data/geopixel/sam_tiny.npz

It builds GeoPixel's SAM-2 (``build_sam2`` on ``sam2_hiera_l.yaml`` with hydra overrides for the
tiny sizes of ``Sam2Config.tiny``) and its ``text_hidden_fcs`` (GeoPixel's own
``initialize_geopixel_modules``, the hub download replaced by that model), fills every tensor with
``sam2_random.random_tensor`` (so the project draws the same weights), then runs GeoPixel's
``encode_g_img`` and the mask loop of ``evaluate`` (the same calls in the same order) on two
synthetic tiles written as PNG, in float32 and in bfloat16 (``model.bfloat16()`` under CPU
autocast, as chat.py runs it under CUDA autocast). Patched: the float32 run builds the dense
positional grid with the random-Fourier matrix cast to bfloat16 (GeoPixel's grid is bfloat16;
with a float32 matrix its matmul is a dtype error, GeoPixel only runs in bfloat16). Weights are
not saved: only inputs, outputs (subsampled where large) and the tensor names and shapes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geochat_qgis.core.models.geopixel.sam2_config import Sam2Config  # noqa: E402 (after sys.path)
from geochat_qgis.core.models.geopixel.sam2_random import random_tensor  # noqa: E402

HIDDEN = 64
SEED = 0
# Larger single-mask logits than the plain random draw, so that some [SEG] masks pass the
# stability test (0.98) and others fall back to the multimask outputs: both paths are compared.
WEIGHT_SCALES = {"model.visual_model.sam_mask_decoder.output_hypernetworks_mlps.0.layers.2.weight": 4.0}
# (name, height, width, pixel repeat, [SEG] rows among 10 hidden-state rows, scale of each [SEG] row);
# a tile is a small one repeated (stored small): a (two-tone) is upscaled to 1024, b (random blocks)
# downscaled; a's first [SEG] mask falls back to the multimask outputs, its second passes (stability)
TILES = (("a", 48, 80, 1, (3, 7), (1.0, 6.0)), ("b", 1200, 1040, 8, (5,), (3.0,)))


def two_tone(height: int, width: int, seed: int) -> np.ndarray:
    """Dark top half, light bottom half, +-8 grey levels of noise."""
    noise = np.random.default_rng(seed).integers(-8, 9, (height, width, 3))
    return np.clip(np.where(np.arange(height)[:, None, None] < height // 2, 30, 220) + noise, 0, 255).astype(np.uint8)


def small_tile(height: int, width: int, seed: int) -> np.ndarray:
    """A random RGB tile with smooth and blocky structure."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3)).astype(np.float64)
    base = blocks.repeat(4, 0).repeat(4, 1)[:height, :width]
    y, x = np.mgrid[0:height, 0:width]
    wave = 60.0 * np.sin(x / 5.0 + seed)[..., None] * np.cos(y / 7.0)[..., None]
    return np.clip(0.6 * base + 50 + wave, 0, 255).astype(np.uint8)


def expand(small: np.ndarray, repeat: int, height: int, width: int) -> np.ndarray:
    """``small`` repeated ``repeat`` x ``repeat`` and cut to height x width (the test does the same)."""
    return np.ascontiguousarray(small.repeat(repeat, 0).repeat(repeat, 1)[:height, :width])


def hydra_overrides(config: Sam2Config) -> list[str]:
    """Overrides of sam2_hiera_l.yaml giving GeoPixel's SAM2Base the sizes of ``config``."""
    d = config.d_model
    trunk, neck = "model.image_encoder.trunk.", "model.image_encoder.neck."
    layer = "model.memory_attention.layer."

    def seq(values) -> str:
        return "[" + ",".join(str(v) for v in values) + "]"

    return [
        f"{trunk}embed_dim={config.embed_dim}", f"{trunk}num_heads={config.num_heads}",
        f"{trunk}stages={seq(config.stages)}", f"{trunk}global_att_blocks={seq(config.global_att_blocks)}",
        f"{trunk}window_spec={seq(config.window_spec)}",
        f"{trunk}window_pos_embed_bkg_spatial_size={seq(config.window_pos_embed_size)}",
        f"{neck}d_model={d}", f"{neck}backbone_channel_list={seq(reversed(config.stage_dims))}",
        f"{neck}position_encoding.num_pos_feats={d}",
        f"model.memory_attention.d_model={d}", f"{layer}d_model={d}",
        f"{layer}self_attention.embedding_dim={d}", f"{layer}cross_attention.embedding_dim={d}",
        f"{layer}cross_attention.kv_in_dim={config.mem_dim}", f"{layer}dim_feedforward={config.mem_ffn}",
        f"model.memory_attention.num_layers={config.mem_layers}", f"model.memory_encoder.out_dim={config.mem_dim}",
        f"++model.memory_encoder.in_dim={d}", f"++model.memory_encoder.mask_downsampler.embed_dim={d}",
        f"model.memory_encoder.fuser.layer.dim={d}", f"model.memory_encoder.fuser.num_layers={config.fuser_layers}",
        f"model.num_maskmem={config.num_maskmem}",
    ]


def build(config: Sam2Config):
    """GeoPixel's meta-model part (visual_model, _transform, text_hidden_fcs) with random weights."""
    from model import geopixel
    from model.sam2.build_sam import build_sam2

    sam = build_sam2("sam2_hiera_l.yaml", ckpt_path=None, hydra_overrides_extra=hydra_overrides(config))
    geopixel.build_sam2_hf = lambda model_id, **kwargs: sam  # the hub download, replaced
    holder = torch.nn.Module()
    holder.vision_pretrained = "facebook/sam2-hiera-large"
    hf_config = types.SimpleNamespace(hidden_size=config.hidden_size, out_dim=config.d_model,
                                      train_mask_decoder=False)
    geopixel.GeoPixelMetaModel.initialize_geopixel_modules(holder, hf_config)
    holder.eval()
    with torch.no_grad():
        for name, tensor in holder.state_dict().items():
            value = random_tensor("model." + name, tuple(tensor.shape), SEED) * WEIGHT_SCALES.get("model." + name, 1.0)
            tensor.copy_(torch.from_numpy(value))
    return holder


def dense_pe_in_bf16():
    """Patch: the grid's matmul with the matrix cast to the grid's dtype (bf16), as a bf16 model."""
    from model.sam2.modeling.position_encoding import PositionEmbeddingRandom

    original = PositionEmbeddingRandom.forward

    def forward(self, size):
        matrix = self.positional_encoding_gaussian_matrix
        self.positional_encoding_gaussian_matrix = matrix.to(torch.bfloat16)
        try:
            return original(self, size)
        finally:
            self.positional_encoding_gaussian_matrix = matrix

    PositionEmbeddingRandom.forward = forward


def run(holder, path: str, hidden, seg_rows) -> dict:
    """GeoPixel's encode_g_img + evaluate's mask loop for one image; the arrays to keep."""
    from model.geopixel import GeoPixelForCausalLM

    runner = types.SimpleNamespace(model=holder, device=torch.device("cpu"))
    runner.get_visual_embs = types.MethodType(GeoPixelForCausalLM.get_visual_embs, runner)
    visual = holder.visual_model
    seg_mask = torch.zeros((1, hidden.shape[1]), dtype=torch.bool)
    seg_mask[0, list(seg_rows)] = True
    out = {}
    with torch.no_grad():
        last_hidden_state = torch.stack([holder.text_hidden_fcs[0](hidden)], dim=-1).sum(dim=-1)
        pred_embeddings = [states[masks] for states, masks in zip(last_hidden_state, seg_mask)]
        features, ori_hw = GeoPixelForCausalLM.encode_g_img(runner, path)
        out["pixels"] = holder._transform(Image.open(path)).float()
        i = 0
        sparse, dense = visual.sam_prompt_encoder(points=None, boxes=None, masks=None,
                                                  text_embeds=pred_embeddings[i].unsqueeze(1))
        high_res = [level[i].unsqueeze(0) for level in features["high_res_feats"]]
        sparse = sparse.to(pred_embeddings[i].dtype)
        embeds = features["image_embed"][i].unsqueeze(0).to(torch.bfloat16)
        image_pe = visual.sam_prompt_encoder.get_dense_pe()
        kwargs = dict(image_embeddings=embeds, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                      dense_prompt_embeddings=dense, repeat_image=pred_embeddings[i].shape[0] > 1,
                      high_res_features=high_res)
        low_res, iou, _, _ = visual.sam_mask_decoder(multimask_output=False, **kwargs)
        masks = holder._transform.postprocess_masks(low_res, ori_hw[i])[:, 0]
        all_masks = visual.sam_mask_decoder.predict_masks(**kwargs)[0]
        stable = visual.sam_mask_decoder._get_stability_scores(all_masks[:, 0:1])[:, 0]
    out.update(image_embed=features["image_embed"], s0=features["high_res_feats"][0],
               s1=features["high_res_feats"][1], sparse=sparse, dense=dense[0, :, 0, 0], image_pe=image_pe,
               embeds_bf16=embeds, low_res=low_res, iou=iou, masks=masks, stability=stable)
    return out


def keep(prefix: str, arrays: dict, big: bool) -> dict:
    """The arrays stored for one run: small ones whole, large ones subsampled, plus full sums."""
    def f32(t) -> np.ndarray:
        return t.detach().float().numpy()

    stored = {}
    for name, tensor in arrays.items():
        full = f32(tensor)
        stored[f"{prefix}_{name}_stats"] = np.array([full.astype(np.float64).sum(),
                                                     np.abs(full.astype(np.float64)).sum()])
    if prefix.endswith("f32"):  # the same pixels in both runs; the decoder's exact input once
        stored[f"{prefix}_pixels_sub"] = f32(arrays["pixels"])[:, ::16, ::16]
        stored[f"{prefix}_embeds_bf16"] = arrays["embeds_bf16"].to(torch.bfloat16).view(torch.int16).numpy()
    stored[f"{prefix}_image_embed_sub"] = f32(arrays["image_embed"])[0, :, ::8, ::8]
    stored[f"{prefix}_s0_sub"] = f32(arrays["s0"])[0, :, ::16, ::16]
    stored[f"{prefix}_s1_sub"] = f32(arrays["s1"])[0, :, ::8, ::8]
    stored[f"{prefix}_image_pe_sub"] = f32(arrays["image_pe"])[0, :, ::4, ::4]
    for name in ("sparse", "dense", "iou", "stability"):
        stored[f"{prefix}_{name}"] = f32(arrays[name])
    low_res = f32(arrays["low_res"])
    stored[f"{prefix}_low_res_sub"] = low_res[:, 0, ::4, ::4]
    stored[f"{prefix}_low_res_bits"] = np.packbits(low_res > 0)
    masks = f32(arrays["masks"])
    stored[f"{prefix}_masks_sub"] = masks[:, ::16, ::16] if big else masks
    stored[f"{prefix}_masks_bits"] = np.packbits(masks > 0)
    return stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("geopixel", type=Path, help="GeoPixel source folder (holds model/geopixel.py)")
    parser.add_argument("out", type=Path, help="the .npz to write")
    args = parser.parse_args()
    out = args.out.resolve()
    sys.path.insert(0, str(args.geopixel.resolve()))
    os.chdir(args.geopixel)  # hydra's config module path is relative (model/sam2_configs)
    torch.manual_seed(0)
    holder = build(Sam2Config.tiny(HIDDEN))
    holder_bf16 = copy.deepcopy(holder).bfloat16()
    shapes = {"model." + k: list(v.shape) for k, v in holder.state_dict().items()}
    from model.sam2.build_sam import build_sam2

    large = build_sam2("sam2_hiera_l.yaml", ckpt_path=None)  # GeoPixel's Hiera-L layout (names, shapes)
    large_shapes = {"model.visual_model." + k: list(v.shape) for k, v in large.state_dict().items()}
    del large
    stored = {"state_shapes": np.array(json.dumps(shapes)), "large_state_shapes": np.array(json.dumps(large_shapes)),
              "hidden_size": np.array(HIDDEN),
              "seed": np.array(SEED), "weight_scales": np.array(json.dumps(WEIGHT_SCALES))}
    dense_pe_in_bf16()
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        for name, height, width, repeat, seg_rows, scales in TILES:
            maker = two_tone if name == "a" else small_tile
            small = maker(-(-height // repeat), -(-width // repeat), seed=ord(name))
            tile = expand(small, repeat, height, width)
            path = str(Path(tmp) / f"{name}.png")
            Image.fromarray(tile).save(path)
            hidden = rng.standard_normal((1, 10, HIDDEN)).astype(np.float32)
            for row, scale in zip(seg_rows, scales):
                hidden[0, row] *= scale
            hidden = torch.from_numpy(hidden).to(torch.bfloat16).float()  # bf16-exact for both runs
            stored[f"{name}_tile_small"] = small
            stored[f"{name}_tile_shape"] = np.array([height, width, repeat])
            stored[f"{name}_hidden"] = hidden[0, list(seg_rows)].numpy()
            f32 = run(holder, path, hidden, seg_rows)
            stored.update(keep(f"{name}_f32", f32, big=height * width > 10000))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = run(holder_bf16, path, hidden.to(torch.bfloat16), seg_rows)
            stored.update(keep(f"{name}_bf16", bf16, big=height * width > 10000))
            print(name, "stability f32", f32["stability"].tolist(), "bf16", bf16["stability"].float().tolist())
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **stored)
    print("wrote", out, out.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
