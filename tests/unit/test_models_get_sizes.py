"""Output size estimates for the real GeoChat-7B, from its configs (no download needed)."""
from __future__ import annotations

import pytest

from geochat_qgis.core.weights.sizes import output_sizes, rough_weight_counts, weight_counts

# MBZUAI/geochat-7B's config.json (the fields the estimate reads) and CLIP-336's vision config
GEOCHAT_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
              "mm_hidden_size": 1024, "mm_use_im_patch_token": True,
              "mm_use_im_start_end": False, "torch_dtype": "float16"}
CLIP_336 = {"vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
                              "num_hidden_layers": 24, "patch_size": 14, "image_size": 336}}


def test_parameter_counts_match_llama2_7b_and_clip_large():
    counts = weight_counts(GEOCHAT_7B, CLIP_336)
    assert counts["text"] == 6_738_423_808  # Llama-2-7B with one added token (<im_patch>)
    assert counts["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert 290e6 < counts["vision_gguf"] < counts["vision_hf"] < 310e6  # CLIP-L minus a layer


@pytest.mark.parametrize("target, quant, low, high, temp", [
    ("gguf", "q4_k_m", 4.5e9, 4.9e9, 13.4e9),  # llama.cpp's Llama-2-7B Q4_K_M is 4.08 GB
    ("gguf", "q8_0", 7.6e9, 8.0e9, 13.4e9),  # 7.16 GB + the mmproj
    ("gguf", "f16", 13.9e9, 14.3e9, 0),
    ("hf", None, 13.9e9, 14.4e9, 0),
])
def test_output_and_temporary_sizes(target, quant, low, high, temp):
    size, temporary = output_sizes(target, quant, weight_counts(GEOCHAT_7B, CLIP_336), 2)
    assert low < size < high
    assert temporary == pytest.approx(temp, rel=0.01) if temp else temporary == 0


def test_rough_estimate_from_download_size_is_close_to_the_exact_one():
    exact = output_sizes("gguf", "q4_k_m", weight_counts(GEOCHAT_7B, CLIP_336), 2)[0]
    rough = output_sizes("gguf", "q4_k_m", rough_weight_counts(14_130_000_000, 2), 2)[0]
    assert rough == pytest.approx(exact, rel=0.05)
