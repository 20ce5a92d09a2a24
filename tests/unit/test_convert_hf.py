"""GeoChat checkpoint -> standard LLaVA folder, checked without torch: the tensors, config,
tokenizer and processor are what GeoChat itself runs with (models.md list). Loading and running
it in transformers: test_convert_hf_transformers.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geochat_qgis.core.families.llava_v1 import SYSTEM, llava_v1_prompt
from geochat_qgis.core.weights.checkpoint_io import open_tensors
from geochat_qgis.core.weights.tensor_data import bf16_to_f32
from test_weights_helpers import (QUESTION, ckpt, hf_dir, keys_bicubic_table, original_arrays,  # noqa: F401
                                  processor, random_image)

pytestmark = pytest.mark.slow
QUESTION = "[refer] Give me the location of <p> car </p>"


def _converted(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the converted folder, read with the numpy reader (float32 values)."""
    arrays = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        with open_tensors(shard) as tensors:
            arrays.update({name: bf16_to_f32(t.array) if t.dtype == "bfloat16" else np.array(t.array)
                           for name, t in tensors.items()})
    return arrays


def test_weights_are_geochats_and_the_clip_towers(hf_dir: Path, ckpt: Path) -> None:
    """The converted tensors against the originals, without torch: CLIP's tower (not the stale
    copy) with GeoChat's 1297-row table, the projector and text copied, two mean rows added."""
    held, original = _converted(hf_dir), original_arrays(ckpt)
    table = original["clip.vision_model.embeddings.position_embedding.weight"]
    np.testing.assert_array_equal(held["vision_tower.vision_model.embeddings.position_embedding.weight"],
                                  keys_bicubic_table(table, 36))
    name = "encoder.layers.0.self_attn.q_proj.weight"
    assert np.array_equal(held[f"vision_tower.vision_model.{name}"], original[f"clip.vision_model.{name}"])
    assert not np.array_equal(held[f"vision_tower.vision_model.{name}"],
                              original[f"model.vision_tower.vision_tower.vision_model.{name}"])
    assert np.array_equal(held["multi_modal_projector.linear_1.weight"], original["model.mm_projector.0.weight"])
    assert np.array_equal(held["multi_modal_projector.linear_2.bias"], original["model.mm_projector.2.bias"])
    assert np.array_equal(held["language_model.model.layers.1.self_attn.k_proj.weight"],
                          original["model.layers.1.self_attn.k_proj.weight"])
    head, embed = held["language_model.lm_head.weight"], held["language_model.model.embed_tokens.weight"]
    assert head.shape == embed.shape == (514, 64)
    assert np.array_equal(head[:512], original["lm_head.weight"])
    mean = original["model.embed_tokens.weight"].mean(axis=0, dtype=np.float32)
    np.testing.assert_allclose(embed[512:], np.stack([mean, mean]), rtol=0, atol=1e-6)
    assert not [n for n in held if "rotary_emb" in n or "vision_tower.vision_tower" in n]


def test_config_has_geochat_settings(hf_dir: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert config["model_type"] == "llava"
    assert vision["image_size"] == 504 and vision["patch_size"] == 14
    assert vision["hidden_act"] == "quick_gelu"
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default"
    assert config["projector_hidden_act"] == "gelu" and config["multimodal_projector_bias"]
    assert config["image_seq_length"] == 1296
    assert text["rms_norm_eps"] == 1e-5
    assert text["tie_word_embeddings"] is False and config["tie_word_embeddings"] is False
    assert (text["eos_token_id"], text["pad_token_id"], text["bos_token_id"]) == (2, 0, 1)
    # 512 SentencePiece pieces + GeoChat's <im_patch> (mm_use_im_patch_token) + <image>
    assert text["vocab_size"] == 514 and config["image_token_id"] == 513
    legacy = json.loads((hf_dir / "preprocessor_config.json").read_text())  # transformers 4, vLLM
    assert legacy["do_pad"] and legacy["size"] == {"shortest_edge": 504} and legacy["resample"] == 3


def test_tokenizer_reproduces_geochats_chunked_slow_tokenizer(processor, ckpt: Path) -> None:
    """GeoChat tokenises the text around <image> separately (tokenizer_image_token)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    prompt = llava_v1_prompt([(QUESTION, None)])
    before, after = prompt.split("<image>")
    expected = [1, *sp.encode(before), 513, *sp.encode(after)]
    assert sp.id_to_piece(sp.encode(after)[0]) == "▁"  # the "▁" after <image> (models.md 7)
    assert processor.tokenizer(prompt).input_ids == expected


def test_chat_template_is_llava_v1_bos_first(processor, hf_dir: Path) -> None:
    """Issue 23: vLLM's chat endpoint tokenises the rendered template without special tokens,
    so the template itself starts with <s>; transformers then adds none (one BOS)."""
    first = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    messages = [{"role": "user", "content": first}]
    assert processor.apply_chat_template(messages) == "<s>" + llava_v1_prompt([(QUESTION, None)])
    turns = messages + [{"role": "assistant", "content": "{<1><2><3><4>|<5>}"},
                        {"role": "user", "content": [{"type": "text", "text": "and the ship?"}]}]
    assert processor.apply_chat_template(turns) == "<s>" + llava_v1_prompt(
        [(QUESTION, "{<1><2><3><4>|<5>}"), ("and the ship?", None)])
    assert processor.apply_chat_template(messages).startswith("<s>" + SYSTEM + " USER: <image>\n")
    assert (hf_dir / "chat_template.jinja").read_text().startswith("{{- bos_token -}}")
    with_pixels = [{"role": "user", "content": [{"type": "image", "image": random_image(0)}, first[1]]}]
    ids = processor.apply_chat_template(with_pixels, tokenize=True, return_dict=True)["input_ids"]
    ids = ids[0] if isinstance(ids[0], list) else ids
    assert ids[0] == 1 and ids.count(1) == 1
    as_geochat = processor.tokenizer(llava_v1_prompt([(QUESTION, None)])).input_ids
    assert processor.tokenizer(processor.apply_chat_template(messages),
                               add_special_tokens=False).input_ids == as_geochat


def test_processor_pads_with_clip_mean_and_counts_1296_tokens(processor) -> None:
    wide = np.full((100, 300, 3), 200, dtype=np.uint8)
    pixels = processor.image_processor(images=Image.fromarray(wide), return_tensors="np").pixel_values[0]
    assert pixels.shape == (3, 504, 504)
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    corner = pixels[:, 0, 0]
    expected = (np.array([122, 116, 104]) / 255 - mean) / std  # int(mean*255), truncated
    np.testing.assert_allclose(corner, expected, atol=1e-5, rtol=0)
    inputs = processor(images=random_image(0), text=llava_v1_prompt([(QUESTION, None)]), return_tensors="np")
    assert int((inputs.input_ids == 513).sum()) == 1296


def test_processor_resizes_with_pil_bicubic(processor) -> None:
    image = random_image(3, size=336)
    pixels = processor.image_processor(images=image, return_tensors="np").pixel_values[0]
    resized = np.asarray(image.resize((504, 504), Image.BICUBIC), dtype=np.float32) / 255
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    np.testing.assert_allclose(pixels, ((resized - mean) / std).transpose(2, 0, 1), atol=1e-5, rtol=0)
