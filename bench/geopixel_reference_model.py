"""Loading GeoPixel's own model from a checkpoint folder on the CPU, for bench/geopixel_reference.py.

Imports GeoPixel from a source folder given at run time (nothing of it is in this repository) and
applies the patches listed in geopixel_reference.py's docstring; sizes come from the checkpoint's
tensors. Runs in the reference environment (transformers 4.33.2), not in the project's.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

from PIL import ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from geochat_qgis.core.models.geopixel.sam2_config import hiera_rules  # noqa: E402  (imports no torch)

CLIP = "vit.vision_tower.vision_model."
SAM = "model.visual_model."
# ViT-L/14 at 560 (IXC-2.5's CLIP) and the 4096-wide projector: used when no tensors are given.
REAL_CLIP = {"hidden": 1024, "patch": 14, "image": 560, "layers": 24, "inter": 4096}


def read_shapes(ckpt: Path) -> dict:
    """Checkpoint name -> shape, from the shards (memory-mapped)."""
    import torch

    index = ckpt / "pytorch_model.bin.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "pytorch_model.bin"]
    shapes = {}
    for name in files:
        sd = torch.load(ckpt / name, map_location="cpu", mmap=True, weights_only=True)
        shapes.update({k: tuple(v.shape) for k, v in sd.items()})
    return shapes


def count(shapes: dict, prefix: str) -> int:
    """Number of numbered children under prefix ('...layers.' -> layers.0, layers.1, ...)."""
    idx = {int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def derive_arch(shapes: dict, cfg: dict) -> dict:
    """Sizes of the CLIP, projector, GN and SAM-2 parts: the tensors, then the project's stated rules."""
    if not shapes:
        c = dict(REAL_CLIP, act="quick_gelu", eps=1e-5)
        return {"clip": c, "clip_heads": 16, "proj": (4 * c["hidden"], cfg["hidden_size"], cfg["hidden_size"]),
                "sam2": []}
    pe = shapes[CLIP + "embeddings.patch_embedding.weight"]
    npos = shapes[CLIP + "embeddings.position_embedding.weight"][0]
    c = {"hidden": pe[0], "patch": pe[2], "image": int(math.isqrt(npos - 1)) * pe[2],
         "layers": count(shapes, CLIP + "encoder.layers."),
         "inter": shapes[CLIP + "encoder.layers.0.mlp.fc1.weight"][0]}
    vc = cfg.get("vision_config", {})
    c.update(act=vc.get("hidden_act", "quick_gelu"), eps=vc.get("layer_norm_eps", 1e-5))
    heads = vc.get("num_attention_heads", max(1, c["hidden"] // 64))
    p0, p2 = shapes["vision_proj.0.weight"], shapes["vision_proj.2.weight"]
    arch = {"clip": c, "clip_heads": heads, "proj": (p0[1], p0[0], p2[0]), "gn": shapes["plora_glb_GN"][-1]}
    arch["sam2"] = sam2_overrides(shapes)
    return arch


def sam2_overrides(shapes: dict) -> list:
    """Hydra overrides of sam2_hiera_l.yaml giving the checkpoint's SAM-2 sizes."""
    t, m = SAM + "image_encoder.trunk.", "++model."
    n_blocks = count(shapes, t + "blocks.")
    starts = [i for i in range(1, n_blocks) if t + f"blocks.{i}.proj.weight" in shapes]
    bounds = [0] + starts + [n_blocks]
    stages = [b - a for a, b in zip(bounds, bounds[1:])]
    embed = shapes[t + "patch_embed.proj.weight"][0]
    neck = SAM + "image_encoder.neck.convs."
    chans = [shapes[neck + f"{i}.conv.weight"][1] for i in range(count(shapes, neck))]
    d_model = shapes[neck + "0.conv.weight"][0]
    ma = SAM + "memory_attention.layers.0."
    me = SAM + "memory_encoder."
    mem_out = shapes.get(me + "out_proj.weight", (d_model,))[0]
    ds = SAM + "memory_encoder.mask_downsampler.encoder."
    ds_last = max(int(k[len(ds):].split(".")[0]) for k in shapes if k.startswith(ds))
    rules = hiera_rules(stages, shapes[t + "pos_embed_window"][2])  # the project's rule (no torch there)
    return [
        f"{m}image_encoder.trunk.embed_dim={embed}", f"{m}image_encoder.trunk.num_heads={rules['num_heads']}",
        f"{m}image_encoder.trunk.stages=[{','.join(map(str, stages))}]",
        f"{m}image_encoder.trunk.global_att_blocks=[{','.join(map(str, rules['global_att_blocks']))}]",
        f"{m}image_encoder.trunk.window_spec=[{','.join(map(str, rules['window_spec']))}]",
        f"{m}image_encoder.trunk.window_pos_embed_bkg_spatial_size=[{','.join(map(str, shapes[t + 'pos_embed'][2:]))}]",
        f"{m}image_encoder.neck.d_model={d_model}",
        f"{m}image_encoder.neck.backbone_channel_list=[{','.join(map(str, chans))}]",
        f"{m}image_encoder.neck.position_encoding.num_pos_feats={d_model}",
        f"{m}memory_attention.d_model={d_model}", f"{m}memory_attention.layer.d_model={d_model}",
        f"{m}memory_attention.num_layers={count(shapes, SAM + 'memory_attention.layers.')}",
        f"{m}memory_attention.layer.dim_feedforward={shapes[ma + 'linear1.weight'][0]}",
        f"{m}memory_attention.layer.self_attention.embedding_dim={d_model}",
        f"{m}memory_attention.layer.cross_attention.embedding_dim={d_model}",
        f"{m}memory_attention.layer.cross_attention.kv_in_dim={shapes[ma + 'cross_attn_image.k_proj.weight'][1]}",
        f"{m}memory_encoder.out_dim={mem_out}", f"{m}memory_encoder.in_dim={d_model}",
        f"{m}memory_encoder.position_encoding.num_pos_feats={mem_out}",
        f"{m}memory_encoder.mask_downsampler.embed_dim={shapes[ds + f'{ds_last}.weight'][0]}",
        f"{m}memory_encoder.fuser.layer.dim={shapes[me + 'fuser.layers.0.dwconv.weight'][0]}",
        f"{m}memory_encoder.fuser.num_layers={count(shapes, me + 'fuser.layers.')}",
        f"{m}num_maskmem={shapes[SAM + 'maskmem_tpos_enc'][0]}",
    ]


def install_patches(src: Path, arch: dict) -> None:
    """The patches listed in the module docstring; GeoPixel's modules are imported from src."""
    import torch
    from torch import nn

    sys.path.insert(0, str(src))  # GeoPixel's modules import only from its source folder
    import model.geopixel as gp
    import model.IXC.build_mlp as bm
    import model.IXC.modeling_internlm_xcomposer2 as ixc
    from model.sam2.build_sam import build_sam2
    from model.sam2.modeling.sam.prompt_encoder import PromptEncoder
    from transformers import CLIPVisionConfig, CLIPVisionModel

    ixc.get_font = ImageFont.load_default
    c = arch["clip"]

    def load_model(self):
        cfg = CLIPVisionConfig(hidden_size=c["hidden"], intermediate_size=c["inter"], num_hidden_layers=c["layers"],
                               num_attention_heads=arch["clip_heads"], image_size=c["image"], patch_size=c["patch"],
                               hidden_act=c["act"], layer_norm_eps=c["eps"])
        self.vision_tower = CLIPVisionModel(cfg)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    bm.CLIPVisionTower.load_model = load_model
    p_in, p_mid, p_out = arch["proj"]
    ixc.build_vision_projector = lambda: nn.Sequential(nn.Linear(p_in, p_mid), nn.GELU(), nn.Linear(p_mid, p_out))
    init = ixc.InternLMXComposer2ForCausalLM.__init__
    width = arch.get("gn", 4096)

    def init_gn(self, config):
        init(self, config)
        if width != 4096:
            self.plora_glb_GN = nn.Parameter(torch.zeros([1, 1, width]))
            self.plora_sub_GN = nn.Parameter(torch.zeros([1, 1, 1, width]))

    ixc.InternLMXComposer2ForCausalLM.__init__ = init_gn
    dense_pe = PromptEncoder.get_dense_pe
    PromptEncoder.get_dense_pe = lambda self: autocast_bf16(dense_pe, self)
    gp.build_sam2_hf = lambda model_id, **kw: build_sam2("sam2_hiera_l.yaml", None, hydra_overrides_extra=arch["sam2"])


def autocast_bf16(fn, *args):
    """Patch 6: fn under CPU bf16 autocast, as chat.py runs all of evaluate under CUDA bf16 autocast."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn(*args)


@contextlib.contextmanager
def cuda_is_cpu():
    """Patch 1: ``.cuda()`` keeps a tensor where it is."""
    import torch

    old = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = old


def load(src: Path, ckpt: Path, dtype: str):
    """(model, tokenizer, [SEG] id, sizes used) as chat.py builds them, on the CPU; fails on any key mismatch."""
    import torch

    cfg = json.loads((ckpt / "config.json").read_text())
    shapes = read_shapes(ckpt)
    arch = derive_arch(shapes, cfg)
    install_patches(src, arch)
    from model.geopixel import GeoPixelForCausalLM
    from model.IXC.configuration_internlm_xcomposer2 import InternLMXcomposer2Config
    from model.IXC.tokenization_internlm2 import InternLM2Tokenizer

    tok = InternLM2Tokenizer.from_pretrained(str(ckpt), padding_side="right")
    tok.pad_token = tok.unk_token
    ids = [tok(t, add_special_tokens=False).input_ids[0] for t in ("[SEG]", "<p>", "</p>")]
    config = InternLMXcomposer2Config.from_pretrained(str(ckpt))
    config.attn_implementation = "eager"
    td = torch.float32 if dtype == "float32" else torch.bfloat16
    model, info = GeoPixelForCausalLM.from_pretrained(
        str(ckpt), config=config, low_cpu_mem_usage=True, torch_dtype=td, output_loading_info=True,
        vision_pretrained="facebook/sam2-hiera-large", seg_token_idx=ids[0], bop_token_idx=ids[1],
        eop_token_idx=ids[2])
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    # 4.33 drops missing keys under low_cpu_mem_usage (meta tensors look tied): compare the names too
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad.update({"missing": sorted(set(have) - set(shapes)), "unexpected": sorted(set(shapes) - set(have)),
                "shape": sorted(k for k in have if k in shapes and have[k] != shapes[k]),
                "meta": [k for k, v in model.state_dict().items() if v.is_meta]})
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise SystemExit(f"checkpoint does not match GeoPixel's model: {bad}")
    model.config.eos_token_id, model.config.bos_token_id = tok.eos_token_id, tok.bos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.tokenizer = tok
    model = (model.float() if dtype == "float32" else model.bfloat16()).eval()
    return model, tok, ids[0], arch


def dump_keys(src: Path, cfg: dict, shapes: dict, out: Path) -> None:
    """GeoPixel's state_dict names and shapes for a config, parameters built on the meta device."""
    from accelerate import init_empty_weights

    install_patches(src, derive_arch(shapes, cfg))
    from model.geopixel import GeoPixelForCausalLM
    from model.IXC.configuration_internlm_xcomposer2 import InternLMXcomposer2Config

    config = InternLMXcomposer2Config(**dict(cfg, attn_implementation="eager"))
    with init_empty_weights():
        model = GeoPixelForCausalLM(config, seg_token_idx=cfg["vocab_size"] - 3,
                                    vision_pretrained="facebook/sam2-hiera-large")
    lines = [f"{k}\t{tuple(v.shape)}\t{str(v.dtype).replace('torch.', '')}" for k, v in model.state_dict().items()]
    out.write_text("\n".join(lines) + "\n")
