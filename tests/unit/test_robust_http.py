"""A hostile OpenAI server: every odd answer is a failed tile with a message, never a crash or a
silent success (issue 15: 3, 8)."""
from __future__ import annotations

import hostile
import numpy as np
import pytest

from geochat_qgis.core.backends.base import CancelToken, Conversation, GenerateOptions
from geochat_qgis.core.backends.openai_http import HttpSettings, OpenAIHttpBackend
from geochat_qgis.core.errors import BackendError

TILE = np.zeros((32, 32, 3), np.uint8)


def _generate(server: hostile.HostileServer, stream: bool) -> str:
    backend = OpenAIHttpBackend("geochat", settings=HttpSettings(base_url=server.url, retries=1,
                                                                  backoff=0.01, timeout=10))
    options = GenerateOptions(cancel=CancelToken() if stream else None)
    with backend:
        (generation,) = backend.generate([TILE], Conversation.single("car?"), options)
    return generation.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_good_answer_still_works(stream):
    with hostile.HostileServer("ok", text="<p>car</p> {<1><2><3><4>}") as server:
        assert _generate(server, stream) == "<p>car</p> {<1><2><3><4>}"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode, message", [
    ("garbage", "not an OpenAI chat completion.*not an event stream|not an OpenAI chat"),
    ("json-list", "not an OpenAI chat completion.*(list|not an event stream)"),
    ("cut-length", "cut off|not an OpenAI chat completion"),
    ("cut-chunked", "stopped before its end|cut off|not an OpenAI chat completion"),
    ("sse-list", "not an OpenAI chat completion"),
])
def test_odd_answers_are_backend_errors(mode, message, stream):
    with hostile.HostileServer(mode) as server:
        with pytest.raises(BackendError, match=message):
            _generate(server, stream)


@pytest.mark.parametrize("models", [b"[1, 2]", b'{"data": {"id": 3}}', b'["geochat"]',
                                    b'{"data": [1, "x", {"id": []}]}', b"\xff\xfe"])
def test_odd_model_listings_do_not_stop_the_check(models):
    with hostile.HostileServer("ok", text="fine", models=models) as server:
        assert _generate(server, stream=False) == "fine"
