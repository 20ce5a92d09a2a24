"""The same tiny GeoChat converted to HF and to GGUF (float32) answers alike.

Same image (504 px, so no resize on either side), same GeoChat ``llava_v1`` prompt: transformers
with the converted processor on the PIL path, llama.cpp with the llava_v1 template (not
llama-cpp-python's default LLaVA template). The image features are compared too: llama.cpp
0.3.36's LLaVA graph appends CLS after the patches while still reading rows 1..N (a llama.cpp
bug), so its features equal either transformers' (a fixed llama.cpp) or transformers' with that
ordering reproduced; anything else means the conversion is wrong.
"""
from __future__ import annotations

import ctypes
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from geochat_qgis.core.families.llava_v1 import llava_v1_prompt
from geochat_qgis.core.weights.gguf_writer import MMPROJ_GGUF, TEXT_GGUF
from geochat_qgis.core.weights.tiny import build_tiny_geochat

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp")
QUESTION = "[refer] Give me the location of <p> car </p>"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """(hf folder, gguf folder) converted from one GeoChat checkpoint."""
    from geochat_qgis.core.weights.convert_hf import convert_geochat_to_hf
    from geochat_qgis.core.weights.gguf_writer import convert_geochat_to_gguf

    root = tmp_path_factory.mktemp("parity")
    ckpt = build_tiny_geochat(root / "ckpt", "geochat-checkpoint", seed=0)
    return convert_geochat_to_hf(ckpt, root / "hf"), convert_geochat_to_gguf(ckpt, root / "gguf")


@pytest.fixture(scope="module")
def hf(pair):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(pair[0]).eval()
    return model, AutoProcessor.from_pretrained(pair[0], backend="pil")


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (504, 504, 3), dtype=np.uint8)


def _hf_greedy(hf, pixels: np.ndarray) -> tuple[int, list[int]]:
    model, processor = hf
    prompt = llava_v1_prompt([(QUESTION, None)])
    inputs = processor(images=Image.fromarray(pixels), text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return inputs.input_ids.shape[1], out[0, inputs.input_ids.shape[1]:].tolist()


def _llama_greedy(gguf_dir: Path, pixels: np.ndarray) -> tuple[int, list[int]]:
    """Greedy tokens from llama.cpp, prompt rendered by llava_v1_prompt with the image marker."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")

    class LlavaV1Handler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = None
        CHAT_FORMAT = ("{% for message in messages %}{% for part in message.content %}"
                       "{% if part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}{% endfor %}")

        def load_image(self, image_url: str) -> bytes:
            return buffer.getvalue()

    handler = LlavaV1Handler(clip_model_path=str(gguf_dir / MMPROJ_GGUF), verbose=False)
    llm = Llama(model_path=str(gguf_dir / TEXT_GGUF), chat_handler=handler, n_ctx=2048,
                n_threads=2, verbose=False)
    seen: dict[str, np.ndarray] = {}

    def record(input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        seen["ids"] = input_ids.copy()
        return logits

    key = "tile://0"
    prompt = llava_v1_prompt([(QUESTION, None)]).replace("<image>", key)
    try:
        reply = handler(llama=llm, messages=[{"role": "user", "content": [
            {"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": key}}]}],
            temperature=0.0, repeat_penalty=1.0, max_tokens=NEW_TOKENS + 1, stop=[],
            logits_processor=[record])
    finally:
        llm.close()
    n_prompt = reply["usage"]["prompt_tokens"]
    return n_prompt, seen["ids"][n_prompt:n_prompt + NEW_TOKENS].tolist()


def _llama_image_features(gguf_dir: Path, pixels: np.ndarray) -> np.ndarray:
    from llama_cpp import Llama
    from llama_cpp import mtmd_cpp as mtmd

    llm = Llama(model_path=str(gguf_dir / TEXT_GGUF), n_ctx=2048, n_threads=2, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads = False, False, 2
    ctx = mtmd.mtmd_init_from_file(str(gguf_dir / MMPROJ_GGUF).encode(), llm.model, params)
    data = np.ascontiguousarray(pixels)
    bitmap = mtmd.mtmd_bitmap_init(504, 504, (ctypes.c_uint8 * data.size).from_buffer(data))
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        text = mtmd.mtmd_input_text()
        marker = mtmd.mtmd_default_marker()
        text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
                flat = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * 64,))
                return flat.reshape(n, 64).copy()
        raise AssertionError("no image chunk")
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        llm.close()


def _reference_features(hf, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' image features, and the same with llama.cpp's CLS-last ordering."""
    model, processor = hf
    values = processor.image_processor(images=Image.fromarray(pixels), return_tensors="pt").pixel_values
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    with torch.no_grad():
        hidden = tower(values, output_hidden_states=True).hidden_states[-2]
        reference = projector(hidden[0, 1:]).numpy()  # layer -2, CLS dropped
        # llama.cpp's ordering: CLS after the patches, positions 0..N in order, rows 1..N kept
        embeddings = tower.embeddings
        patches = embeddings.patch_embedding(values).flatten(2).transpose(1, 2)
        x = torch.cat([patches, embeddings.class_embedding.expand(1, 1, -1)], dim=1)
        x = tower.pre_layrnorm(x + embeddings.position_embedding.weight[None])
        for layer in tower.encoder.layers[:-1]:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        cls_last = projector(x[0, 1:]).numpy()
    return reference, cls_last


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to ggml's tanh-approximated GELU (~1e-3 of the feature scale)."""
    return float(np.abs(a - b).max()) < 2e-3 * float(np.abs(b).max())


@pytest.mark.parametrize("seed", [0, 1])
def test_mmproj_features_match_transformers(pair, hf, seed: int) -> None:
    """The mmproj computes transformers' features, up to llama.cpp's own CLS-order bug."""
    reference, cls_last = _reference_features(hf, _pixels(seed))
    features = _llama_image_features(pair[1], _pixels(seed))
    assert features.shape == reference.shape == (1296, 64)
    assert _close(features, reference) or _close(features, cls_last)


@pytest.mark.parametrize("seed", [0, 1])
def test_same_greedy_tokens_given_the_same_image_features(pair, hf, seed: int) -> None:
    """Text model, tokenizer, llava_v1 template and image placement agree exactly: transformers
    decoding from llama.cpp's own image features gives llama.cpp's tokens."""
    model, processor = hf
    pixels = _pixels(seed)
    features = torch.from_numpy(_llama_image_features(pair[1], pixels))
    inputs = processor(images=Image.fromarray(pixels), text=llava_v1_prompt([(QUESTION, None)]),
                       return_tensors="pt")
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs.input_ids)
        embeds[inputs.input_ids == model.config.image_token_id] = features
        out = model.generate(inputs_embeds=embeds, attention_mask=inputs.attention_mask,
                             max_new_tokens=NEW_TOKENS, do_sample=False)
    n_prompt, llama_tokens = _llama_greedy(pair[1], pixels)
    assert n_prompt == inputs.input_ids.shape[1] == 1296 + 119
    assert out[0, -NEW_TOKENS:].tolist() == llama_tokens


@pytest.mark.parametrize("seed", [0, 1])
def test_hf_and_gguf_give_the_same_greedy_tokens(pair, hf, seed: int) -> None:
    pixels = _pixels(seed)
    reference, cls_last = _reference_features(hf, pixels)
    features = _llama_image_features(pair[1], pixels)
    if not _close(features, reference):
        assert _close(features, cls_last)
        pytest.xfail("this llama.cpp build appends CLS after the patches in its LLaVA graph "
                     "(tools/mtmd/models/llava.cpp), shifting every image feature by one; "
                     "the conversion itself is verified by the two tests above")
    hf_prompt, hf_tokens = _hf_greedy(hf, pixels)
    gguf_prompt, gguf_tokens = _llama_greedy(pair[1], pixels)
    assert hf_prompt == gguf_prompt == 1296 + 119
    assert len(hf_tokens) == NEW_TOKENS and gguf_tokens == hf_tokens
