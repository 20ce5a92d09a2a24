"""The OpenAI HTTP backend against a real ``python -m llama_cpp.server`` on 127.0.0.1.

The server runs the tiny GeoChat GGUF with ``--chat_format mtmd`` (the GGUF's own llava_v1 chat
template). It encodes images with libmtmd, whose LLaVA graph is wrong for GeoChat (CLS last; the
in-process backend computes GeoChat's features itself on such builds). So greedy answers over
HTTP are compared with the in-process backend running libmtmd too: equal answers show that both
paths send the same prompt and the same pixels; the in-process default (the project's encoder)
evaluates the same prompt tokens.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from geochat_qgis.core.backends.base import Conversation, GenerateOptions
from geochat_qgis.core.backends.grammar import REFER_GRAMMAR
from geochat_qgis.core.backends.llama_cpp import LlamaCppBackend, LlamaCppSettings
from geochat_qgis.core.backends.openai_http import HttpSettings, OpenAIHttpBackend
from geochat_qgis.core.errors import BackendError
from geochat_qgis.core.families import get_family

pytest.importorskip("llama_cpp.server")
pytestmark = pytest.mark.slow

REFER = "[refer] Give me the location of <p> car </p>"
KEY = "test-key-5"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """``python -m llama_cpp.server`` for a GGUF folder, on a free local port."""

    def __init__(self, folder: Path, log: Path, api_key: str = "") -> None:
        self.port = free_port()
        self.log = open(log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(folder / "model.gguf"),
             "--clip_model_path", str(folder / "mmproj.gguf"), "--chat_format", "mtmd",
             "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(self.port),
             *(["--api_key", api_key] if api_key else [])],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while True:
            try:
                request = urllib.request.Request(f"{self.url}/models",
                                                 headers={"Authorization": f"Bearer {api_key}"})
                with urllib.request.urlopen(request, timeout=2) as response:
                    self.models = json.load(response)
                break
            except OSError as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"llama_cpp.server did not start: see {log}") from exc
                time.sleep(0.3)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    running = LlamaServer(tiny_gguf, tmp_path_factory.mktemp("server") / "server.log", KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tiles():
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (504, 504, 3), dtype=np.uint8) for _ in range(3)]


def test_http_answers_equal_in_process_llama_cpp(server, tiny_gguf, tiles):
    """Same prompt tokens, same greedy answers as in process with the server's image graph
    (llama-cpp-python's completion may run past max_tokens to finish a multi-byte character,
    so free text is compared as a prefix)."""
    model = server.models["data"][0]["id"]
    http = OpenAIHttpBackend(model, settings=HttpSettings(base_url=server.url, api_key=KEY,
                                                             max_in_flight=2))
    free = GenerateOptions(max_new_tokens=20)
    boxes = GenerateOptions(max_new_tokens=256, grammar=REFER_GRAMMAR)
    same_graph = LlamaCppSettings(vision="libmtmd")
    with http, LlamaCppBackend(tiny_gguf, settings=same_graph) as local, \
            LlamaCppBackend(tiny_gguf) as own:
        for options in (free, boxes):
            over_http = http.generate(tiles, Conversation.single(REFER), options)
            in_process = local.generate(tiles, Conversation.single(REFER), options)
            assert [g.prompt_tokens for g in over_http] == [g.prompt_tokens for g in in_process]
            if options is free:  # the project's encoder: the same prompt, GeoChat's features
                project = own.generate(tiles, Conversation.single(REFER), options)
                assert [g.prompt_tokens for g in project] == [g.prompt_tokens for g in over_http]
                assert own.vision.startswith("the project") and local.vision == "libmtmd"
            for remote, here in zip(over_http, in_process):
                assert remote.text.startswith(here.text) and len(here.text) > 3
    assert [g.text for g in over_http] == [g.text for g in in_process]  # the grammar's run
    family = get_family("geochat")
    for generation in over_http:  # grammar-constrained answers parse into boxes
        answer = family.parse(generation.text, 504)
        assert answer.detections and not answer.problems, generation.text


def test_streaming_over_sse(server, tiles):
    pieces: list[str] = []
    http = OpenAIHttpBackend("tiny", settings=HttpSettings(base_url=server.url, api_key=KEY))
    streamed = http.generate(tiles[:1], Conversation.single(REFER), GenerateOptions(
        max_new_tokens=12, on_token=lambda index, piece: pieces.append(piece)))
    whole = http.generate(tiles[:1], Conversation.single(REFER), GenerateOptions(max_new_tokens=12))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == streamed[0].text == whole[0].text


def test_wrong_api_key_is_refused_before_any_tile(server):
    http = OpenAIHttpBackend("tiny", settings=HttpSettings(base_url=server.url, api_key="wrong"))
    with pytest.raises(BackendError, match="HTTP 401.*GEOCHAT_API_KEY"):
        http.load()


def test_cancel_mid_stream(server, tiles):
    from geochat_qgis.core.backends.base import CancelToken
    from geochat_qgis.core.errors import Cancelled

    cancel = CancelToken()
    pieces: list[str] = []

    def on_token(index: int, piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.cancel()

    http = OpenAIHttpBackend("tiny", settings=HttpSettings(base_url=server.url, api_key=KEY))
    with pytest.raises(Cancelled):
        http.generate(tiles[:1], Conversation.single(REFER),
                      GenerateOptions(max_new_tokens=200, on_token=on_token, cancel=cancel))
    assert len(pieces) == 3


def test_requests_about_a_tile_share_their_start(server, tiles):
    """Issue 16: a tile's prompts and chat turns send the same system message and PNG first and
    ask llama-server to keep the prefix (``cache_prompt``); the server answers such requests."""
    from geochat_qgis.core.backends.base import Turn

    http = OpenAIHttpBackend("tiny", settings=HttpSettings(base_url=server.url, api_key=KEY))
    options = GenerateOptions(max_new_tokens=4)
    conversations = [Conversation.single(REFER), Conversation.single("[refer] the road"),
                     Conversation([Turn(REFER, "a car"), Turn("and the road?")])]
    bodies = [json.loads(http._payload(tiles[0], c, options, False)) for c in conversations]
    assert all(body["cache_prompt"] is True for body in bodies)
    starts = [(body["messages"][0], body["messages"][1]["content"][0]) for body in bodies]
    assert starts[0] == starts[1] == starts[2] and starts[0][1]["type"] == "image_url"
    assert bodies[0]["messages"] != bodies[1]["messages"]
    with http:
        answers = [http.generate(tiles[:1], c, options)[0] for c in conversations]
    assert all(a.generated_tokens >= 1 for a in answers)
    assert answers[2].prompt_tokens > answers[0].prompt_tokens


def test_one_bos_through_llama_cpp_server(server, tiny_gguf, tiles):
    """Issue 23: the GGUF's chat template renders no <s> (llama-cpp-python's multimodal handler
    adds BOS on top of the rendered text): the server counts exactly the tokens of GeoChat's
    prompt with one BOS, the 1296 image rows and the text after the image."""
    from llama_cpp import Llama

    from geochat_qgis.core.families.llava_v1 import IMAGE_TOKEN, llava_v1_prompt

    vocab = Llama(model_path=str(tiny_gguf / "model.gguf"), vocab_only=True, verbose=False)
    before, after = llava_v1_prompt([(REFER, None)]).split(IMAGE_TOKEN)
    head = vocab.tokenize(before.encode(), add_bos=True, special=True)
    tail = vocab.tokenize(after.encode(), add_bos=False, special=True)
    bos = vocab.token_bos()
    assert head[0] == bos and head.count(bos) == 1
    assert vocab.tokenize(b"<s>" + before.encode(), add_bos=True, special=True)[:2] == [bos, bos]
    http = OpenAIHttpBackend("tiny", settings=HttpSettings(base_url=server.url, api_key=KEY))
    (answer,) = http.generate(tiles[:1], Conversation.single(REFER), GenerateOptions(max_new_tokens=2))
    assert answer.prompt_tokens == len(head) + 36 * 36 + len(tail)
