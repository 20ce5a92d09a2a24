"""A chat's follow-up after its extent or its history changed: what a fresh evaluation gives.

core.chat through the real llama.cpp backend (the project's image encoder) and the tiny GGUF;
greedy decoding, so the continued and the fresh answers must be the same text.
"""
from __future__ import annotations

import pytest
import rasterio

from geochat_qgis.core.backends.llama_cpp import LlamaCppBackend, LlamaCppSettings
from geochat_qgis.core.chat import ChatRequest, as_history, ask

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def backend(tiny_gguf):
    settings = LlamaCppSettings(vision="project", n_threads=2)
    with LlamaCppBackend(tiny_gguf, settings=settings) as loaded:
        yield loaded


def _extent(raster, col: int, row: int, size: int = 300):
    with rasterio.open(raster) as ds:
        left, top, res = ds.bounds.left, ds.bounds.top, ds.res[0]
    return (left + col * res, top - (row + size) * res, left + (col + size) * res,
            top - row * res)


def _fresh(backend, request: ChatRequest):
    backend.evaluator.forget()
    reply = ask(request, backend)
    assert reply.evaluated_tokens == reply.prompt_tokens
    return reply


def test_follow_up_on_another_extent_or_history_answers_as_a_fresh_chat(backend, demo_raster):
    raster = str(demo_raster)
    first = ask(ChatRequest(raster, "what is in this image?", extent=_extent(raster, 0, 0),
                            extent_crs="EPSG:3857", max_new_tokens=8), backend)
    history = as_history([first])
    moved = ChatRequest(raster, "and the road?", extent=_extent(raster, 400, 300),
                        extent_crs="EPSG:3857", history=history, max_new_tokens=8)
    second = ask(moved, backend)
    assert second.evaluated_tokens > 1296  # another tile: its image evaluated again
    assert second.answer.raw == _fresh(backend, moved).answer.raw

    ask(moved, backend)
    edited = ChatRequest(raster, "and the road?", extent=moved.extent, extent_crs="EPSG:3857",
                         history=[(history[0][0], "a river " + history[0][1])], max_new_tokens=8)
    changed = ask(edited, backend)
    assert changed.evaluated_tokens < changed.prompt_tokens - 1296  # the image is kept
    assert changed.answer.raw == _fresh(backend, edited).answer.raw


@pytest.mark.parametrize("history", [[("only a question",)], [("q", None)], ["q and a"],
                                     [("q", "a", "b")]])
def test_history_that_is_not_pairs_of_texts_says_so(backend, demo_raster, history):
    from geochat_qgis.core.errors import GeoChatError

    with pytest.raises(GeoChatError, match="history item 1 .* not \\[question, answer\\]"):
        ask(ChatRequest(str(demo_raster), "and the road?", history=history, max_new_tokens=2),
            backend)


def test_history_as_json_lists_is_taken(backend, demo_raster):
    reply = ask(ChatRequest(str(demo_raster), "and the road?", history=[["what?", "a road"]],
                            max_new_tokens=2), backend)
    assert reply.prompt_tokens > 1296


def test_follow_up_after_the_model_changed_answers_as_a_fresh_chat(tiny_gguf, demo_raster):
    """The shared backend cache: another model (here the same file with a float32 KV cache,
    another spec) closes the first; the follow-up there is what a fresh evaluation gives."""
    from geochat_qgis.core.backends.factory import BackendCache, BackendSpec

    cache = BackendCache()
    first_spec = BackendSpec("llama.cpp", str(tiny_gguf), settings={"vision": "project"})
    other_spec = BackendSpec("llama.cpp", str(tiny_gguf),
                             settings={"vision": "project", "kv_f32": True})
    try:
        first_backend = cache.get(first_spec)
        first = ask(ChatRequest(str(demo_raster), "what is in this image?", max_new_tokens=6),
                    first_backend)
        follow = ChatRequest(str(demo_raster), "and the road?", history=as_history([first]),
                             max_new_tokens=6)
        other = cache.get(other_spec)
        assert other is not first_backend and first_backend._llama is None  # closed
        second = ask(follow, other)
        assert second.evaluated_tokens == second.prompt_tokens  # nothing carried over
        assert second.answer.raw == _fresh(other, follow).answer.raw
    finally:
        cache.clear()
