"""The converted GeoChat LLaVA folder in transformers (torch by design: tests/conftest.py lists
this file): it loads with no custom code or missing keys, holds GeoChat's tensors and generates
greedily with the image mattering."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geochat_qgis.core.families.llava_v1 import llava_v1_prompt
from test_weights_helpers import (QUESTION, ckpt, hf_dir, keys_bicubic_table, original_tensors,  # noqa: F401
                                  processor, random_image)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(hf_dir: Path):
    from transformers import LlavaForConditionalGeneration

    loaded, info = LlavaForConditionalGeneration.from_pretrained(hf_dir, output_loading_info=True)
    return loaded.eval(), info


def test_transformers_loads_without_custom_code_or_missing_keys(model, hf_dir: Path) -> None:
    loaded, info = model
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    assert not list(hf_dir.glob("*.py")), "no custom code in the folder"
    assert not list(hf_dir.glob("*.bin")), "safetensors only"


def test_position_table_is_geochats_bicubic_interpolation(model, ckpt: Path) -> None:
    loaded, _ = model
    table = original_tensors(ckpt)["clip.vision_model.embeddings.position_embedding.weight"]
    assert table.shape == (24 * 24 + 1, 32)
    held = loaded.model.vision_tower.embeddings.position_embedding.weight.detach()
    assert held.shape == (1297, 32)
    assert np.array_equal(held.numpy(), keys_bicubic_table(table.numpy(), 36))  # exact, float64 then rounded
    grid = table[1:].reshape(24, 24, 32).permute(2, 0, 1)[None]
    resized = F.interpolate(grid.double(), size=(36, 36), mode="bicubic", align_corners=True)[0]
    expected = torch.cat([table[:1], resized.float().permute(1, 2, 0).reshape(36 * 36, 32)])
    torch.testing.assert_close(held, expected, rtol=0, atol=2e-7)  # torch's own, in float64
    fast = F.interpolate(grid, size=(36, 36), mode="bicubic", align_corners=True)[0]  # its float32 kernel
    torch.testing.assert_close(held[1:], fast.permute(1, 2, 0).reshape(-1, 32), rtol=0, atol=1e-5)
    # transformers' own align_corners=False interpolation would be a different table
    other = F.interpolate(grid, size=(36, 36), mode="bicubic", align_corners=False)[0]
    assert not torch.allclose(held[1:], other.permute(1, 2, 0).reshape(-1, 32), atol=1e-3)


def test_vision_weights_come_from_clip_not_the_stale_copy(model, ckpt: Path) -> None:
    loaded, _ = model
    original = original_tensors(ckpt)
    tower = loaded.model.vision_tower
    for name in ("encoder.layers.0.self_attn.q_proj.weight", "embeddings.patch_embedding.weight",
                 "encoder.layers.2.mlp.fc2.bias", "pre_layrnorm.weight"):
        held = tower.get_parameter(name).detach()
        assert torch.equal(held, original[f"clip.vision_model.{name}"])
        assert not torch.equal(held, original[f"model.vision_tower.vision_tower.vision_model.{name}"])


def test_projector_and_text_weights_are_copied_exactly(model, ckpt: Path) -> None:
    loaded, _ = model
    original = original_tensors(ckpt)
    projector = loaded.model.multi_modal_projector
    assert torch.equal(projector.linear_1.weight.detach(), original["model.mm_projector.0.weight"])
    assert torch.equal(projector.linear_1.bias.detach(), original["model.mm_projector.0.bias"])
    assert torch.equal(projector.linear_2.weight.detach(), original["model.mm_projector.2.weight"])
    assert torch.equal(projector.linear_2.bias.detach(), original["model.mm_projector.2.bias"])
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(projector.act(x), x * 0.5 * (1 + torch.erf(x / 2 ** 0.5)))  # erf GELU
    text = loaded.model.language_model
    assert torch.equal(text.layers[1].self_attn.k_proj.weight.detach(),
                       original["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(text.norm.weight.detach(), original["model.norm.weight"])


def test_added_rows_are_the_mean_and_never_win_greedy(model, ckpt: Path) -> None:
    loaded, _ = model
    original = original_tensors(ckpt)
    embed = loaded.model.language_model.embed_tokens.weight.detach()
    head = loaded.lm_head.weight.detach()
    assert torch.equal(embed[:512], original["model.embed_tokens.weight"])
    assert torch.equal(head[:512], original["lm_head.weight"])
    for row in (512, 513):  # <im_patch>, <image>
        torch.testing.assert_close(head[row], original["lm_head.weight"].mean(0))
        torch.testing.assert_close(embed[row], original["model.embed_tokens.weight"].mean(0))
    hidden = torch.randn(2000, 64, generator=torch.Generator().manual_seed(1)) * 5
    logits = hidden @ head.T
    assert not bool(((logits.argmax(1) == 512) | (logits.argmax(1) == 513)).any())


def test_generates_greedy_and_the_image_matters(model, processor) -> None:
    loaded, _ = model
    prompt = llava_v1_prompt([(QUESTION, None)])
    last_logits = []
    for seed in (0, 1):
        inputs = processor(images=random_image(seed), text=prompt, return_tensors="pt")
        with torch.no_grad():
            out = loaded.generate(**inputs, max_new_tokens=12, do_sample=False)
            last_logits.append(loaded(**inputs).logits[0, -1])
        new = out[0, inputs.input_ids.shape[1]:].tolist()
        assert len(new) == 12 and 513 not in new and 512 not in new
    assert float((last_logits[0] - last_logits[1]).abs().max()) > 0.1
