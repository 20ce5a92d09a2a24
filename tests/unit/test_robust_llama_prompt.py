"""Hostile prompts for the llama.cpp prompt evaluator (the project's own image embeddings).

Real llama.cpp, the project's tiny GeoChat GGUF. Every continued evaluation must give what a
fresh one gives: a colliding image id, another tile of the same pixels, a prompt that does not
fit, a cancel or a failed llama_decode half-way through the image.
"""
from __future__ import annotations

import numpy as np
import pytest

from geochat_qgis.core.backends.base import Conversation, GenerateOptions
from geochat_qgis.core.backends.llama_cpp import LlamaCppBackend, LlamaCppSettings
from geochat_qgis.core.backends.llama_prompt import ImageSegment, segment_ids
from geochat_qgis.core.errors import BackendError, Cancelled
from geochat_qgis.core.vision.encoder import tile_key

llama_cpp = pytest.importorskip("llama_cpp")

ASK = Conversation.single("[refer] Give me the location of <p> car </p>")
#: two 1 px tiles whose 30-bit image ids collide (found by a search over 1 px colours)
COLLIDING = (np.array([[[0, 87, 208]]], np.uint8), np.array([[[0, 218, 30]]], np.uint8))


@pytest.fixture(scope="module")
def backend(tiny_gguf):
    settings = LlamaCppSettings(vision="project", n_threads=2)
    with LlamaCppBackend(tiny_gguf, settings=settings) as loaded:
        yield loaded


def _fresh(backend, image, conversation=ASK) -> np.ndarray:
    backend.evaluator.forget()
    return backend.next_token_logits(image, conversation)


def _tile(seed: int, shape=(504, 504, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_colliding_image_ids_never_reuse_the_other_images_cache(backend):
    a, b = COLLIDING
    segments = [backend.segments(tile, ASK) for tile in COLLIDING]
    assert segment_ids(segments[0]) == segment_ids(segments[1])  # same ids, other pixels
    assert segments[0][1].key != segments[1][1].key
    first = _fresh(backend, a)
    continued = backend.next_token_logits(b, ASK)
    assert backend.evaluator.evaluated > 1296  # b's image evaluated, not a's cache reused
    fresh = _fresh(backend, b)
    assert not np.allclose(first, fresh, atol=1e-3)  # the two images answer differently
    np.testing.assert_allclose(continued, fresh, atol=1e-5)
    np.testing.assert_allclose(backend.next_token_logits(a, ASK), first, atol=1e-5)


def test_same_pixels_in_another_shape_are_another_image(backend):
    a = _tile(1, (36, 56, 3))
    b = a.reshape(56, 36, 3)  # the same bytes
    assert tile_key(a) != tile_key(b)
    _fresh(backend, a)
    continued = backend.next_token_logits(b, ASK)
    assert backend.evaluator.evaluated > 1296
    np.testing.assert_allclose(continued, _fresh(backend, b), atol=1e-5)


def test_prompt_longer_than_the_context_says_so_and_keeps_the_state(backend):
    tile = _tile(2)
    expected = _fresh(backend, tile)
    history = Conversation.single("describe the image " * 400)
    with pytest.raises(BackendError, match="more than the context.*new conversation"):
        backend.generate([tile], history, GenerateOptions(max_new_tokens=2))
    again = backend.next_token_logits(tile, ASK)
    assert backend.evaluator.evaluated == 0  # the context still holds the earlier prompt
    np.testing.assert_allclose(again, expected, atol=1e-5)


def test_image_larger_than_the_context_asks_for_a_larger_context(backend, tmp_path):
    from geochat_qgis.core.backends.llama_prompt import PromptEvaluator
    from geochat_qgis.core.vision.encoder import ImageEncoder
    from geochat_qgis.core.vision.tiny_gguf import ClipDims, write_mlp_mmproj

    mmproj = write_mlp_mmproj(tmp_path / "mmproj-672.gguf", 64, ClipDims(image_size=672))
    rows = ImageEncoder(mmproj, device="cpu").embed(_tile(3))
    segments = backend.segments(_tile(3), ASK)
    segments[1] = ImageSegment("ab" * 16, rows)
    evaluator = PromptEvaluator(backend._llama)
    try:
        with pytest.raises(BackendError, match="2304 of them the image.*raise.*n_ctx"):
            evaluator.evaluate(segments)
    finally:
        evaluator.close()


def test_geochat_mmproj_of_another_image_size_is_refused(tiny_gguf, tmp_path):
    """A 336 px mmproj (CLIP-336 as stored) would silently not be what GeoChat computes."""
    from geochat_qgis.core.errors import ModelError
    from geochat_qgis.core.vision.tiny_gguf import ClipDims, write_mlp_mmproj

    mmproj = write_mlp_mmproj(tmp_path / "mmproj-336.gguf", 64, ClipDims(image_size=336))
    with pytest.raises(ModelError, match="mmproj-336.gguf takes 336 px.*504.*models get"):
        LlamaCppBackend(tiny_gguf / "model.gguf", mmproj).load()


def test_cancel_between_image_batches_leaves_a_consistent_context(backend):
    tile = _tile(4)
    expected = _fresh(backend, tile)
    backend.evaluator.forget()
    segments = backend.segments(tile, ASK)
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:  # text before, first 512 image rows, then cancel
            raise Cancelled("cancelled")

    with pytest.raises(Cancelled):
        backend.evaluator.evaluate(segments, check)
    llama = backend._llama
    done = len(segments[0]) + backend.evaluator.n_batch
    assert llama.n_tokens == done
    assert (llama.input_ids[len(segments[0]):done] == segments[1].token_id).all()
    again = backend.next_token_logits(tile, ASK)
    assert backend.evaluator.evaluated == len(segment_ids(segments)) - done
    np.testing.assert_allclose(again, expected, atol=1e-5)


def test_failed_llama_decode_leaves_the_next_prompt_right(backend, monkeypatch):
    """llama_decode returns 1 (no KV slot) for the second image batch: the error says what
    to do, and the next prompt, another tile, answers as a fresh evaluation does."""
    tile, other = _tile(5), _tile(6)
    expected = _fresh(backend, other)
    backend.evaluator.forget()
    real, calls = llama_cpp.llama_decode, []

    def decode(ctx, batch):
        calls.append(1)
        return 1 if len(calls) == 2 else real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    with pytest.raises(BackendError, match="returned 1.*n_ctx"):
        backend.next_token_logits(tile, ASK)
    monkeypatch.undo()
    segments = backend.segments(tile, ASK)
    assert backend._llama.n_tokens == len(segments[0]) + backend.evaluator.n_batch
    np.testing.assert_allclose(backend.next_token_logits(other, ASK), expected, atol=1e-5)
    assert isinstance(segments[1], ImageSegment)


def test_failed_decode_while_answering_is_a_backend_error(backend, monkeypatch):
    """A llama_decode failing on a generated token (llama-cpp-python raises RuntimeError) is a
    BackendError, and the next answer is the fresh one."""
    tile = _tile(7)
    options = GenerateOptions(max_new_tokens=6)
    backend.evaluator.forget()
    expected = backend.generate([tile], ASK, options)[0].text
    backend.evaluator.forget()
    inner = llama_cpp.llama_cpp  # what Llama.eval calls (the evaluator's image rows do not)
    real, calls = inner.llama_decode, []

    def decode(ctx, batch):
        calls.append(1)
        return 1 if len(calls) == 3 else real(ctx, batch)  # text, text, first answer token

    monkeypatch.setattr(inner, "llama_decode", decode)
    with pytest.raises(BackendError, match="while writing the answer.*n_ctx"):
        backend.generate([tile], ASK, options)
    monkeypatch.undo()
    assert backend.generate([tile], ASK, options)[0].text == expected


def test_conversation_without_a_question_is_a_backend_error(backend):
    with pytest.raises(BackendError, match="no question"):
        backend.generate([_tile(8)], Conversation([]), GenerateOptions(max_new_tokens=2))


@pytest.mark.parametrize("settings, message", [
    (dict(n_ctx="4096"), "n_ctx must be a whole number.*not '4096'"),
    (dict(n_ctx=4096.5), "n_ctx must be a whole number"),
    (dict(n_ctx=2 ** 33), "n_ctx must be a whole number from 1 to 1048576"),
    (dict(n_batch=0), "n_batch must be a whole number"),
    (dict(n_threads="2"), "n_threads must be a whole number"),
    (dict(kv_f32="no"), "kv_f32 must be true or false"),
])
def test_hand_written_settings_of_the_wrong_kind_say_so(tiny_gguf, settings, message):
    """A request's model options reach LlamaCppSettings as written: a string n_ctx was a
    TypeError, 2**33 a 32 GiB MemoryError, kv_f32 "no" turned the float32 KV cache on."""
    with pytest.raises(BackendError, match=message):
        LlamaCppBackend(tiny_gguf, settings=LlamaCppSettings(**settings)).load()


def test_whole_numbers_from_a_form_are_taken(tiny_gguf):
    settings = LlamaCppSettings(n_ctx=4096.0, n_threads=2.0, vision="project")
    with LlamaCppBackend(tiny_gguf, settings=settings) as loaded:
        assert loaded._llama.n_ctx() == 4096 and settings.n_threads == 2


@pytest.mark.parametrize("device", ["gpu", "cuda"])
def test_image_encoder_device_that_cannot_run_says_so(tiny_gguf, device):
    """vision_device 'cuda' with a CPU-only torch was a bare AssertionError (and 'gpu' blamed
    the mmproj); both are BackendErrors naming the device."""
    torch = pytest.importorskip("torch")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is here: the device runs")
    backend = LlamaCppBackend(tiny_gguf, settings=LlamaCppSettings(
        vision="project", vision_device=device, n_threads=2))
    with pytest.raises(BackendError, match=f"cannot use device '{device}'.*choose 'cpu'"):
        backend.load()
    assert backend._llama is None
