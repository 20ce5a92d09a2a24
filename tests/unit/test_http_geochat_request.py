"""What an OpenAI-compatible server gets for GeoChat (issue 23), without a model: the converted
folder's chat template starts with BOS (vLLM adds none), the GGUF's does not (llama.cpp adds
one), and the request carries the tile already padded and resized as GeoChat does (504 px, pad
(122, 116, 104), PIL bicubic), so whatever resize the server runs changes nothing."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from chat_server import serve_chat
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

from geochat_qgis.core.backends.base import CancelToken, Conversation, GenerateOptions, Turn
from geochat_qgis.core.backends.messages import chat_messages
from geochat_qgis.core.backends.openai_http import HttpSettings, OpenAIHttpBackend
from geochat_qgis.core.families.llava_v1 import llava_v1_prompt
from geochat_qgis.core.vision.preprocess import GEOCHAT_PAD, geochat_image
from geochat_qgis.core.weights.geochat_tokenizer import HF_CHAT_TEMPLATE, LLAVA_V1_CHAT_TEMPLATE

chat = pytest.fixture(serve_chat)
QUESTION = "[refer] Give me the location of <p> car </p>"


def _render(template: str, messages: list) -> str:
    """The template as a server renders it (vLLM and transformers: a sandboxed Jinja with
    ``bos_token`` and ``eos_token``; content parts as OpenAI sends them, images as 'image')."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    parts = [{**m, "content": [{"type": "image"} if p["type"] == "image_url" else p
                               for p in m["content"]]} if isinstance(m["content"], list) else m
             for m in messages]
    return env.from_string(template).render(messages=parts, bos_token="<s>", eos_token="</s>",
                                            add_generation_prompt=True)


@pytest.mark.parametrize("conversation", [
    Conversation.single(QUESTION),
    Conversation([Turn(QUESTION, "{<1><2><3><4>|<5>}"), Turn("and the ship?")]),
])
def test_the_converted_template_starts_with_bos_and_the_gguf_template_does_not(conversation):
    messages = chat_messages(conversation, "data:image/png;base64,AAAA")
    geochat = llava_v1_prompt(conversation.pairs())
    assert _render(HF_CHAT_TEMPLATE, messages) == "<s>" + geochat
    assert _render(LLAVA_V1_CHAT_TEMPLATE, messages) == geochat  # llama.cpp adds BOS itself


def _sent_png(chat, image: np.ndarray, family: str = "geochat") -> np.ndarray:
    """The pixels of the PNG the backend sends for ``image`` (decoded from the request)."""
    backend = OpenAIHttpBackend("m", family, HttpSettings(base_url=chat.base_url, retries=0))
    with backend:  # streamed (a cancel token): the test server streams
        backend.generate([image], Conversation.single("car?", family),
                         GenerateOptions(max_new_tokens=4, cancel=CancelToken()))
    url = chat.bodies[-1]["messages"][-1]["content"][0]["image_url"]["url"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(url[len(prefix):]))) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        return np.asarray(png)


@pytest.mark.parametrize("height, width", [(200, 300), (336, 336), (900, 700), (504, 504)])
def test_the_request_carries_geochats_504_px_padded_image(chat, height, width):
    tile = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    sent = _sent_png(chat, tile)
    assert sent.shape == (504, 504, 3)
    assert np.array_equal(sent, geochat_image(tile))  # bit for bit: pad, then PIL bicubic
    if height == width == 504:
        assert np.array_equal(sent, tile)
    square = np.full((max(height, width),) * 2 + (3,), GEOCHAT_PAD, np.uint8)
    top, left = (square.shape[0] - height) // 2, (square.shape[1] - width) // 2
    square[top:top + height, left:left + width] = tile
    expected = Image.fromarray(square).resize((504, 504), Image.Resampling.BICUBIC)
    assert np.array_equal(sent, np.asarray(expected))
    if height < width:  # the pad colour fills the top rows
        assert (sent[0] == GEOCHAT_PAD).all()


def test_other_families_keep_their_tile_size(chat):
    tile = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    assert np.array_equal(_sent_png(chat, tile, family="qwen"), tile)


def test_a_grammar_goes_to_llama_cpp_and_to_vllm(chat):
    """llama.cpp's servers read ``grammar``, vLLM reads ``structured_outputs.grammar`` (GBNF
    through xgrammar); each ignores the other's field."""
    from geochat_qgis.core.backends.grammar import REFER_GRAMMAR

    backend = OpenAIHttpBackend("m", settings=HttpSettings(base_url=chat.base_url, retries=0))
    with backend:
        backend.generate([np.zeros((8, 8, 3), np.uint8)], Conversation.single(QUESTION),
                         GenerateOptions(max_new_tokens=4, cancel=CancelToken(),
                                         grammar=REFER_GRAMMAR))
    body = chat.bodies[-1]
    assert body["grammar"] == body["structured_outputs"]["grammar"] == REFER_GRAMMAR


@pytest.mark.parametrize("shape", [(504, 504, 3), (1, 1, 3), (9, 1, 3), (1, 9, 3), (300, 200, 3)])
def test_the_png_is_lossless_and_valid(shape):
    """The client's own PNG writer (Sub filter, zlib RLE): PIL reads back every byte, and its
    checksums and chunks verify."""
    from geochat_qgis.core.backends.images import png_bytes

    noise = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
    flat = np.full(shape, GEOCHAT_PAD, np.uint8)
    for image in (noise, flat):
        data = png_bytes(image)
        with Image.open(io.BytesIO(data)) as png:
            png.verify()
        with Image.open(io.BytesIO(data)) as png:
            assert png.mode == "RGB" and np.array_equal(np.asarray(png), image)
    assert len(png_bytes(np.full((504, 504, 3), GEOCHAT_PAD, np.uint8))) < 10_000
