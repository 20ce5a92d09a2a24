"""The published GeoPixel checkpoint's tensor names and shapes, at any sizes.

``checkpoint_layout(sizes)`` lists every tensor ``GeoPixelForCausalLM.state_dict()`` holds, in
the order GeoPixel's modules register them (the order ``save_pretrained`` shards them in):
``plora_glb_GN``, ``plora_sub_GN``, ``model.*`` (InternLM2 with Partial LoRA and the three dead
adapters, SAM-2 as ``model.visual_model.*`` with its video-memory modules, ``text_hidden_fcs``),
``output.weight``, ``vit.vision_tower.vision_model.*`` (transformers' CLIP vision model) and
``vision_proj.*``. Read from GeoPixel's code (model/geopixel.py, model/IXC/*, model/sam2/*);
buffers that are not persistent there (rotary ``inv_freq``, CLIP ``position_ids``) are absent.

Sizes come from the parts' configs (:class:`InternLM2Config`, :class:`IXCVisionConfig`,
:class:`Sam2Config`). The tiny-model maker fills this layout with random tensors; a test checks
it is exactly the parts' own tensors plus the ones the loader skips (dead adapters, SAM-2's
video parts), so the maker, the parts and GeoPixel agree on every name.
"""
from __future__ import annotations

from typing import Iterator

from .decoder import InternLM2Config
from .sam2_config import Sam2Config
from .vision import IXCVisionConfig

Shape = tuple[int, ...]
LORA_RANK = 256  # Plora_A / Plora_B: GeoPixel hard-codes r = alpha = 256
DEAD_ADAPTERS = (("lora_sft", 256), ("lora_dpo", 256), ("lora_web", 512))  # stored, never used


def _linear(name: str, out: int, inp: int, bias: bool = True) -> Iterator[tuple[str, Shape]]:
    yield f"{name}.weight", (out, inp)
    if bias:
        yield f"{name}.bias", (out,)


def _norm(name: str, width: int, bias: bool = True) -> Iterator[tuple[str, Shape]]:
    yield f"{name}.weight", (width,)
    if bias:
        yield f"{name}.bias", (width,)


def _plora(name: str, inp: int, out: int, rank: int) -> Iterator[tuple[str, Shape]]:
    yield f"{name}.weight", (out, inp)
    yield f"{name}.Plora_A.weight", (rank, inp)
    yield f"{name}.Plora_B.weight", (out, rank)
    for adapter, rank in DEAD_ADAPTERS:
        yield f"{name}.{adapter}_A.weight", (rank, inp)
        yield f"{name}.{adapter}_B.weight", (out, rank)


def _text(t: InternLM2Config) -> Iterator[tuple[str, Shape]]:
    h, ffn, r = t.hidden_size, t.intermediate_size, t.lora_r
    yield "model.tok_embeddings.weight", (t.vocab_size, h)
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        yield from _plora(p + "attention.wqkv", h, (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim, r)
        yield from _plora(p + "attention.wo", t.num_attention_heads * t.head_dim, h, r)
        yield from _plora(p + "feed_forward.w1", h, ffn, r)
        yield from _plora(p + "feed_forward.w3", h, ffn, r)
        yield from _plora(p + "feed_forward.w2", ffn, h, r)
        yield p + "attention_norm.weight", (h,)
        yield p + "ffn_norm.weight", (h,)
    yield "model.norm.weight", (h,)


def _mlp(name: str, dims: list[int]) -> Iterator[tuple[str, Shape]]:
    for i, (inp, out) in enumerate(zip(dims, dims[1:])):
        yield from _linear(f"{name}.layers.{i}", out, inp)


def _hiera(s: Sam2Config, p: str) -> Iterator[tuple[str, Shape]]:
    yield p + "pos_embed", (1, s.embed_dim, *s.window_pos_embed_size)
    yield p + "pos_embed_window", (1, s.embed_dim, s.window_spec[0], s.window_spec[0])
    yield p + "patch_embed.proj.weight", (s.embed_dim, 3, 7, 7)
    yield p + "patch_embed.proj.bias", (s.embed_dim,)
    firsts = {sum(s.stages[:i]) for i in range(1, len(s.stages))}
    dim = s.embed_dim
    for i in range(sum(s.stages)):
        out = dim * 2 if i in firsts else dim
        b = f"{p}blocks.{i}."
        yield from _norm(b + "norm1", dim)
        yield from _linear(b + "attn.qkv", 3 * out, dim)
        yield from _linear(b + "attn.proj", out, out)
        yield from _norm(b + "norm2", out)
        yield from _mlp(b + "mlp", [out, 4 * out, out])
        if out != dim:
            yield from _linear(b + "proj", out, dim)
        dim = out


def _attention(name: str, d: int, inner: int, kv_in: int | None = None) -> Iterator[tuple[str, Shape]]:
    yield from _linear(f"{name}.q_proj", inner, d)
    yield from _linear(f"{name}.k_proj", inner, kv_in or d)
    yield from _linear(f"{name}.v_proj", inner, kv_in or d)
    yield from _linear(f"{name}.out_proj", d, inner)


def _memory(s: Sam2Config, p: str) -> Iterator[tuple[str, Shape]]:
    """SAM-2's video-memory modules: stored in the checkpoint, unused on GeoPixel's image path."""
    d = s.d_model
    yield p + "mask_downsample.weight", (1, 1, 4, 4)
    yield p + "mask_downsample.bias", (1,)
    for i in range(s.mem_layers):
        m = f"{p}memory_attention.layers.{i}."
        yield from _attention(m + "self_attn", d, d)
        yield from _attention(m + "cross_attn_image", d, d, s.mem_dim)
        yield from _linear(m + "linear1", s.mem_ffn, d)
        yield from _linear(m + "linear2", d, s.mem_ffn)
        for n in ("norm1", "norm2", "norm3"):
            yield from _norm(m + n, d)
    yield from _norm(p + "memory_attention.norm", d)
    e = p + "memory_encoder."
    chans = [1, 4, 16, 64, 256]
    for j, (cin, cout) in enumerate(zip(chans, chans[1:])):
        yield f"{e}mask_downsampler.encoder.{3 * j}.weight", (cout, cin, 3, 3)
        yield f"{e}mask_downsampler.encoder.{3 * j}.bias", (cout,)
        yield from _norm(f"{e}mask_downsampler.encoder.{3 * j + 1}", cout)
    yield f"{e}mask_downsampler.encoder.12.weight", (d, 256, 1, 1)
    yield f"{e}mask_downsampler.encoder.12.bias", (d,)
    yield e + "pix_feat_proj.weight", (d, d, 1, 1)
    yield e + "pix_feat_proj.bias", (d,)
    for i in range(s.fuser_layers):
        f = f"{e}fuser.layers.{i}."
        yield f + "weight", (d,)  # the layer scale (``gamma`` upstream)
        yield f + "dwconv.weight", (d, 1, 7, 7)
        yield f + "dwconv.bias", (d,)
        yield from _norm(f + "norm", d)
        yield from _linear(f + "pwconv1", 4 * d, d)
        yield from _linear(f + "pwconv2", d, 4 * d)
    if s.mem_dim != d:
        yield e + "out_proj.weight", (s.mem_dim, d, 1, 1)
        yield e + "out_proj.bias", (s.mem_dim,)


def _prompt_encoder(d: int, p: str) -> Iterator[tuple[str, Shape]]:
    yield p + "pe_layer.positional_encoding_gaussian_matrix", (2, d // 2)
    for i in range(4):
        yield f"{p}point_embeddings.{i}.weight", (1, d)
    yield p + "not_a_point_embed.weight", (1, d)
    for j, (cin, cout, k) in enumerate(((1, 4, 2), (4, 16, 2), (16, d, 1))):
        yield f"{p}mask_downscaling.{3 * j}.weight", (cout, cin, k, k)
        yield f"{p}mask_downscaling.{3 * j}.bias", (cout,)
        if j < 2:
            yield from _norm(f"{p}mask_downscaling.{3 * j + 1}", cout)
    yield p + "no_mask_embed.weight", (1, d)


def _mask_decoder(d: int, p: str) -> Iterator[tuple[str, Shape]]:
    t = p + "transformer."
    for i in range(2):
        lay = f"{t}layers.{i}."
        yield from _attention(lay + "self_attn", d, d)
        yield from _norm(lay + "norm1", d)
        yield from _attention(lay + "cross_attn_token_to_image", d, d // 2)
        yield from _norm(lay + "norm2", d)
        yield from _mlp(lay + "mlp", [d, 2048, d])
        yield from _norm(lay + "norm3", d)
        yield from _norm(lay + "norm4", d)
        yield from _attention(lay + "cross_attn_image_to_token", d, d // 2)
    yield from _attention(t + "final_attn_token_to_image", d, d // 2)
    yield from _norm(t + "norm_final_attn", d)
    yield p + "iou_token.weight", (1, d)
    yield p + "mask_tokens.weight", (4, d)
    yield p + "obj_score_token.weight", (1, d)
    yield p + "output_upscaling.0.weight", (d, d // 4, 2, 2)
    yield p + "output_upscaling.0.bias", (d // 4,)
    yield from _norm(p + "output_upscaling.1", d // 4)
    yield p + "output_upscaling.3.weight", (d // 4, d // 8, 2, 2)
    yield p + "output_upscaling.3.bias", (d // 8,)
    yield p + "conv_s0.weight", (d // 8, d, 1, 1)
    yield p + "conv_s0.bias", (d // 8,)
    yield p + "conv_s1.weight", (d // 4, d, 1, 1)
    yield p + "conv_s1.bias", (d // 4,)
    for i in range(4):
        yield from _mlp(f"{p}output_hypernetworks_mlps.{i}", [d, d, d, d // 8])
    yield from _mlp(p + "iou_prediction_head", [d, 256, 256, 4])
    yield from _mlp(p + "pred_obj_score_head", [d, d, d, 1])


def _sam2(s: Sam2Config, p: str = "model.visual_model.") -> Iterator[tuple[str, Shape]]:
    d = s.d_model
    yield p + "maskmem_tpos_enc", (s.num_maskmem, 1, 1, s.mem_dim)
    yield p + "no_mem_embed", (1, 1, d)
    yield p + "no_mem_pos_enc", (1, 1, d)
    yield p + "no_obj_ptr", (1, d)
    yield from _hiera(s, p + "image_encoder.trunk.")
    widths = list(s.stage_dims)[::-1]
    for i, width in enumerate(widths):
        yield f"{p}image_encoder.neck.convs.{i}.conv.weight", (d, width, 1, 1)
        yield f"{p}image_encoder.neck.convs.{i}.conv.bias", (d,)
    yield from _memory(s, p)
    yield from _prompt_encoder(d, p + "sam_prompt_encoder.")
    yield from _mask_decoder(d, p + "sam_mask_decoder.")
    yield from _mlp(p + "obj_ptr_proj", [d, d, d, d])


def _clip(v: IXCVisionConfig, p: str = "vit.vision_tower.vision_model.") -> Iterator[tuple[str, Shape]]:
    c = v.hidden_size
    yield p + "embeddings.class_embedding", (c,)
    yield p + "embeddings.patch_embedding.weight", (c, 3, v.patch_size, v.patch_size)
    yield p + "embeddings.position_embedding.weight", ((v.image_size // v.patch_size) ** 2 + 1, c)
    yield from _norm(p + "pre_layrnorm", c)
    for i in range(v.num_layers):
        lay = f"{p}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            yield from _linear(f"{lay}self_attn.{proj}", c, c)
        yield from _norm(lay + "layer_norm1", c)
        yield from _linear(lay + "mlp.fc1", v.intermediate_size, c)
        yield from _linear(lay + "mlp.fc2", c, v.intermediate_size)
        yield from _norm(lay + "layer_norm2", c)
    yield from _norm(p + "post_layernorm", c)


def checkpoint_layout(text: InternLM2Config, vision: IXCVisionConfig, sam2: Sam2Config) -> dict[str, Shape]:
    """Every tensor of the published layout for these part sizes, name -> shape, in module order."""
    merged = vision.merged_size  # 4 C: the 2x2-merged CLIP token
    h = text.hidden_size
    out: dict[str, Shape] = {"plora_glb_GN": (1, 1, merged), "plora_sub_GN": (1, 1, 1, merged)}
    out.update(_text(text))
    out.update(_sam2(sam2))
    out.update(_linear("model.text_hidden_fcs.0.0", h, h))
    out.update(_linear("model.text_hidden_fcs.0.2", sam2.d_model, h))
    out["output.weight"] = (text.vocab_size, h)
    out.update(_clip(vision))
    out.update(_linear("vision_proj.0", vision.proj_mid, merged))
    out.update(_linear("vision_proj.2", vision.proj_out, vision.proj_mid))
    return out
