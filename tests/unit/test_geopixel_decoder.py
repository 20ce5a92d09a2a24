"""GeoPixel's InternLM2 decoder (Partial LoRA, GQA, RoPE, KV cache): its own invariants on a tiny
random model, and parity with GeoPixel's ``modeling_internlm2`` on the arrays in
tests/data/geopixel/text_reference.npz (made by bench/geopixel_text_reference.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from geochat_qgis.core.cancel import CancelToken
from geochat_qgis.core.errors import Cancelled, ModelError

torch = pytest.importorskip("torch")
from geochat_qgis.core.models.geopixel.decoder import (  # noqa: E402 (needs torch)
    InternLM2Config, PLoRALinear, build_decoder, checkpoint_name_to_param, checkpoint_param_name, load_state,
    random_init)

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "geopixel"
TINY = InternLM2Config(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, lora_r=8, rope_theta=1e6,
                       rms_norm_eps=1e-5, max_position_embeddings=4096, bias=False)


def tiny(config: InternLM2Config = TINY, std: float = 0.2):
    return random_init(build_decoder(config), seed=3, std=std)


def inputs(length: int, image: tuple[int, int] = (1, 12), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, length, TINY.hidden_size, generator=gen)
    im_mask = torch.zeros(1, length, dtype=torch.bool)
    im_mask[0, image[0]:image[1]] = True
    return embeds, im_mask


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(DATA / "text_reference.npz") as npz:
        return {k: npz[k] for k in npz.files}


def ref_decoder(ref: dict[str, np.ndarray], max_pos: int | None = None):
    hf_config = json.loads(str(ref["config_json"]))
    if max_pos is not None:
        hf_config["max_position_embeddings"] = max_pos
    tensors = {k[len("weight:"):]: torch.from_numpy(v) for k, v in ref.items() if k.startswith("weight:")}
    config = InternLM2Config.from_checkpoint(hf_config, {k: tuple(v.shape) for k, v in tensors.items()})
    decoder = build_decoder(config)
    load_state(decoder, tensors)
    return decoder, tensors


def test_kv_cache_prefill_then_single_tokens_equals_full_forward():
    decoder = tiny()
    embeds, im_mask = inputs(30)
    with torch.no_grad():
        full = decoder(embeds, im_mask)
        cache = decoder.new_cache(1, 40)
        parts = [decoder(embeds[:, :20], im_mask[:, :20], cache)]
        parts.append(decoder(embeds[:, 20:24], im_mask[:, 20:24], cache))  # a chunk after a prefill
        parts += [decoder(embeds[:, i:i + 1], im_mask[:, i:i + 1], cache) for i in range(24, 30)]
    assert cache.length == 30
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    assert full.abs().max() > 0.1  # the comparison is not between zeros


def test_left_padded_batch_matches_each_sequence_alone():
    decoder = tiny()
    long_embeds, long_mask = inputs(14, seed=1)
    short_embeds, short_mask = inputs(9, image=(1, 5), seed=2)
    padded = torch.cat([torch.zeros(1, 5, TINY.hidden_size), short_embeds], dim=1)
    padded_mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), short_mask], dim=1)
    valid = torch.ones(2, 14, dtype=torch.bool)
    valid[1, :5] = False
    with torch.no_grad():
        both = decoder(torch.cat([long_embeds, padded]), torch.cat([long_mask, padded_mask]), None, valid)
        alone = [decoder(long_embeds, long_mask), decoder(short_embeds, short_mask)]
    assert torch.allclose(both[0], alone[0][0], atol=1e-5, rtol=0)
    assert torch.allclose(both[1, 5:], alone[1][0], atol=1e-5, rtol=0)


def test_plora_adds_its_delta_on_image_rows_only():
    layer = PLoRALinear(8, 6, bias=True, r=4, scaling=32.0)
    for param in layer.parameters():
        torch.nn.init.normal_(param)
    x = torch.randn(10, 8)
    rows = torch.tensor([2, 3, 7])
    with torch.no_grad():
        out = layer(x, rows)
        base = x @ layer.weight.T + layer.bias
        delta = layer.Plora_B(layer.Plora_A(x)) * 32.0
    others = [i for i in range(10) if i not in (2, 3, 7)]
    assert torch.equal(out[others], base[others])
    assert torch.allclose(out[rows], base[rows] + delta[rows], atol=1e-5)
    assert delta[rows].abs().min() > 0


def test_lora_changes_image_rows_and_what_follows_never_what_precedes():
    decoder = tiny()
    embeds, im_mask = inputs(20, image=(6, 12))
    no_image = torch.zeros_like(im_mask)
    with torch.no_grad():
        with_lora = decoder(embeds, im_mask)
        without = decoder(embeds, no_image)
        for name, param in decoder.named_parameters():
            if "Plora_B" in name:
                param.zero_()
        zeroed = decoder(embeds, im_mask)
    assert torch.equal(with_lora[:, :6], without[:, :6])  # rows before the image (causal)
    assert (with_lora[:, 6:] - without[:, 6:]).abs().amax(-1).min() > 1e-3
    assert torch.allclose(zeroed, without, atol=1e-6)


def test_meta_build_of_the_7b_allocates_nothing_and_has_the_checkpoint_names():
    config = InternLM2Config(vocab_size=92547, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, lora_r=256, rope_theta=1e6,
                             rope_scaling_type="dynamic", rope_scaling_factor=2.0, rms_norm_eps=1e-5,
                             max_position_embeddings=24576, bias=False)
    decoder = build_decoder(config, device="meta", dtype=torch.bfloat16)
    params = dict(decoder.named_parameters())
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in params.values())
    assert not any("lora_sft" in n or "lora_dpo" in n or "lora_web" in n for n in params)
    names = {checkpoint_param_name(n) for n in params}
    assert "model.layers.31.feed_forward.w2.Plora_B.weight" in names and "output.weight" in names
    assert params["layers.0.attention.wqkv.weight"].shape == (6144, 4096)
    assert params["layers.0.attention.wqkv.Plora_A.weight"].shape == (256, 4096)
    base = 2 * 92547 * 4096 + 4096 + 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096)
    lora = 32 * 256 * ((4096 + 6144) + (4096 + 4096) + 3 * (4096 + 14336))
    assert sum(p.numel() for p in params.values()) == base + lora  # 7.74 B + 0.60 B of Partial LoRA
    shapes = {checkpoint_param_name(n): tuple(p.shape) for n, p in params.items()}
    shapes["model.layers.0.attention.wqkv.lora_sft_A.weight"] = (256, 4096)
    hf_config = {"num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 1000000,
                 "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rms_norm_eps": 1e-5,
                 "max_position_embeddings": 24576, "bias": False, "vocab_size": 92544}
    assert InternLM2Config.from_checkpoint(hf_config, shapes) == config


def test_from_checkpoint_names_what_is_wrong():
    shapes = {checkpoint_param_name(n): tuple(p.shape) for n, p in build_decoder(TINY, "meta").named_parameters()}
    good = {"num_attention_heads": 4, "num_key_value_heads": 2}
    assert InternLM2Config.from_checkpoint(good, shapes).lora_scaling == 256 / 8
    with pytest.raises(ModelError, match="num_key_value_heads"):
        InternLM2Config.from_checkpoint({"num_attention_heads": 4}, shapes)
    with pytest.raises(ModelError, match="wqkv"):
        InternLM2Config.from_checkpoint({"num_attention_heads": 4, "num_key_value_heads": 4}, shapes)
    with pytest.raises(ModelError, match="model.tok_embeddings.weight"):
        InternLM2Config.from_checkpoint(good, {k: v for k, v in shapes.items() if "tok_emb" not in k})
    with pytest.raises(ModelError, match="rope_scaling"):
        InternLM2Config.from_checkpoint({**good, "rope_scaling": {"type": "yarn", "factor": 2.0}}, shapes)


def test_load_state_skips_dead_adapters_and_names_bad_tensors():
    source = tiny()
    tensors = {checkpoint_param_name(n): p.detach().clone() for n, p in source.named_parameters()}
    tensors["model.layers.0.attention.wqkv.lora_web_A.weight"] = torch.zeros(512, 64)
    tensors["model.visual_model.image_encoder.trunk.pos_embed"] = torch.zeros(1)  # another part's tensor
    target = build_decoder(TINY, device="meta")
    load_state(target, tensors)
    embeds, im_mask = inputs(12)
    with torch.no_grad():
        assert torch.equal(target(embeds, im_mask), source(embeds, im_mask))
    with pytest.raises(ModelError, match="model.layers.1.ffn_norm.weight"):
        load_state(build_decoder(TINY), {k: v for k, v in tensors.items() if k != "model.layers.1.ffn_norm.weight"})
    with pytest.raises(ModelError, match=r"output.weight.*\(3, 64\)"):
        load_state(build_decoder(TINY), {**tensors, "output.weight": torch.zeros(3, 64)})
    with pytest.raises(ModelError, match="model.layers.0.attention.q_proj.weight"):
        load_state(build_decoder(TINY), {**tensors, "model.layers.0.attention.q_proj.weight": torch.zeros(1)})
    assert checkpoint_name_to_param("model.text_hidden_fcs.0.0.weight") is None


def test_forward_matches_geopixel_modeling_internlm2(ref):
    decoder, _ = ref_decoder(ref)
    assert decoder.config.lora_r == 16 and decoder.config.lora_scaling == 16.0
    embeds = torch.from_numpy(ref["forward_embeds"])
    im_mask = torch.from_numpy(ref["forward_im_mask"])
    with torch.no_grad():
        hidden = decoder(embeds, im_mask)[0]
        logits = decoder.logits(hidden)
    assert np.abs(hidden.numpy() - ref["forward_hidden"]).max() < 1e-5
    assert np.abs(logits.numpy() - ref["forward_logits"]).max() < 1e-5
    assert np.abs(ref["forward_logits"]).max() > 1.0


def test_dynamic_ntk_beyond_max_position_embeddings_matches_geopixel(ref):
    limit = json.loads(str(ref["config_json"]))["ntk_max_position_embeddings"]["forward"]
    decoder, _ = ref_decoder(ref, max_pos=limit)
    embeds = torch.from_numpy(ref["forward_embeds"])
    assert embeds.shape[1] > limit
    with torch.no_grad():
        logits = decoder.logits(decoder(embeds, torch.from_numpy(ref["forward_im_mask"]))[0])
    assert np.abs(logits.numpy() - ref["forward_ntk_logits"]).max() < 1e-5
    assert np.abs(ref["forward_ntk_logits"] - ref["forward_logits"]).max() > 1e-2  # NTK did change them
    cache = decoder.new_cache(1, 64)
    with torch.no_grad():
        decoder(embeds[:, :limit], None, cache)
        with pytest.raises(ModelError, match="RoPE base"):
            decoder(embeds[:, limit:limit + 1], None, cache)


def test_cancel_is_checked_between_layers():
    decoder = tiny()
    cancel = CancelToken()
    calls = []
    decoder.layers[1].attention_norm.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        decoder(*inputs(8), cancel=cancel)
        assert calls == [1]
        decoder.layers[0].feed_forward.register_forward_hook(lambda *_: cancel.cancel())
        with pytest.raises(Cancelled):
            decoder(*inputs(8), cancel=cancel)
    assert calls == [1]  # the second call stopped before the second layer


def test_bfloat16_stays_close_to_float32():
    decoder = tiny(std=0.05)
    embeds, im_mask = inputs(16)
    with torch.no_grad():
        f32 = decoder.logits(decoder(embeds, im_mask))
        bf16 = decoder.to(torch.bfloat16)
        low = bf16.logits(bf16(embeds.to(torch.bfloat16), im_mask))
    assert low.dtype == torch.float32
    assert (low - f32).abs().max() < 0.05 * f32.abs().max()
