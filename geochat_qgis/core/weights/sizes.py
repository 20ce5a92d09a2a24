"""How big a converted GeoChat is, from its two configs: parameter counts times bytes per weight;
and a converted GeoPixel (its published weights less the adapters it never runs).

GGUF text models: q4_k_m about 0.605 bytes per weight (measured: 4.08 GB for Llama-2-7B's
6.74 B), q8_0 34/32, f16 2. The mmproj keeps the checkpoint's float type (f16 for GeoChat-7B:
about 0.62 GB with the 1297-row position table); the HF checkpoint keeps every float weight.
Quantising first writes the float text GGUF: that is the temporary space.
"""
from __future__ import annotations

from typing import Optional

GGUF_BYTES_PER_WEIGHT = {"q4_k_m": 0.605, "q8_0": 34 / 32, "f16": 2.0, "f32": 4.0}
GEOCHAT_GRID = 36  # 504 px / 14 px patches


def weight_counts(geochat: dict, clip: dict) -> dict[str, int]:
    """Parameter counts of the converted parts, from the two configs."""
    h, ff = int(geochat["hidden_size"]), int(geochat["intermediate_size"])
    layers, heads = int(geochat["num_hidden_layers"]), int(geochat["num_attention_heads"])
    kv = int(geochat.get("num_key_value_heads") or heads)
    vocab = int(geochat["vocab_size"]) + int(geochat.get("mm_use_im_patch_token", True)) \
        + 2 * int(bool(geochat.get("mm_use_im_start_end")))
    text = 2 * vocab * h + layers * (2 * h * h + 2 * h * (h * kv // heads) + 3 * h * ff + 2 * h) + h
    v = clip.get("vision_config", clip)
    d, vff, vlayers, patch = (int(v["hidden_size"]), int(v["intermediate_size"]),
                              int(v["num_hidden_layers"]), int(v["patch_size"]))
    layer = 4 * (d * d + d) + 2 * d * vff + vff + d + 4 * d
    embeddings = 3 * patch * patch * d + d + (GEOCHAT_GRID ** 2 + 1) * d + 2 * d
    mm = int(geochat.get("mm_hidden_size", d))
    projector = mm * h + h + h * h + h
    return {"text": text, "projector": projector, "vision_gguf": embeddings + (vlayers - 1) * layer,
            "vision_hf": embeddings + vlayers * layer + 2 * d}


def dtype_bytes(config: Optional[dict]) -> int:
    return 4 if config and str(config.get("torch_dtype")) == "float32" else 2


def output_sizes(target: str, quant: Optional[str], weights: dict[str, int], src_bytes: int) -> tuple[int, int]:
    """(output bytes, temporary bytes) of one choice."""
    if target == "hf":
        return (weights["text"] + weights["projector"] + weights["vision_hf"]) * src_bytes, 0
    half = 2 if quant == "f16" else src_bytes
    mmproj = (weights["projector"] + weights["vision_gguf"]) * half
    if quant == "f16":
        return int(weights["text"] * 2) + mmproj, 0
    text = int(weights["text"] * GGUF_BYTES_PER_WEIGHT[quant])
    return text + mmproj, weights["text"] * src_bytes  # the float text GGUF it is quantised from


def rough_weight_counts(source_bytes: int, src_bytes: int) -> dict[str, int]:
    """Without configs: split the checkpoint's weights as GeoChat-7B's are split."""
    params = source_bytes // src_bytes
    return {"text": int(params * 0.955), "projector": int(params * 0.003),
            "vision_gguf": int(params * 0.041), "vision_hf": int(params * 0.043)}


# GeoPixel (InternLM-XComposer-2.5): every Partial-LoRA linear (wqkv, wo, w1, w3, w2) also stores
# three adapters GeoPixel never runs (IXC's build_mlp.py: lora_sft and lora_dpo of rank 256,
# lora_web of rank 512); the converted checkpoint leaves them out.
GEOPIXEL_DEAD_RANKS = 256 + 256 + 512
GEOPIXEL_DEAD_SHARE = 0.2128  # of GeoPixel-7B's 22.7 GB: 2.42 B of its 11.4 B parameters


def geopixel_dead_adapter_count(config: dict) -> int:
    """Parameters of the unused adapters (lora_sft, lora_dpo, lora_web), from config.json."""
    h, ff = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    qkv = (heads + 2 * kv) * (h // heads)
    per_layer = (h + qkv) + (h + h) + 3 * (h + ff)  # wqkv, wo, then w1, w3, w2
    return int(config["num_hidden_layers"]) * GEOPIXEL_DEAD_RANKS * per_layer


def geopixel_output_bytes(config: Optional[dict], source_bytes: int) -> int:
    """The converted GeoPixel checkpoint: the published weights less the unused adapters."""
    try:
        return max(source_bytes - geopixel_dead_adapter_count(config) * dtype_bytes(config), 0)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return int(source_bytes * (1 - GEOPIXEL_DEAD_SHARE))
