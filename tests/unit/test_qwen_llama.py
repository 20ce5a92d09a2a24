"""Qwen2.5-VL through the real llama.cpp with the project's tiny GGUF pair, and its self-test."""
from __future__ import annotations

import json

import numpy as np
import pytest

from geochat_qgis.core.backends.base import Conversation, GenerateOptions
from geochat_qgis.core.backends.llama_cpp import LlamaCppBackend, LlamaCppSettings
from geochat_qgis.core.runtime.info_ops import model_status
from geochat_qgis.core.vision import selftest
from geochat_qgis.core.vision.qwen_tiny import SPECIAL_TOKENS, write_qwen_pair

llama_cpp = pytest.importorskip("llama_cpp")

PROJECTOR = "qwen2.5vl_merger"
QUESTION = Conversation.single("Describe this image.", family="qwen2.5-vl")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_qwen_pair(tmp_path_factory.mktemp("qwen"))


def _backend(pair) -> LlamaCppBackend:
    return LlamaCppBackend(*pair, family="qwen2.5-vl",
                           settings=LlamaCppSettings(n_ctx=1024, n_threads=2))


def _tile(height: int = 112, width: int = 168, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_tiny_pair_answers_a_tile_through_qwens_chat_handler(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOCHAT_CACHE", str(tmp_path))
    with _backend(pair) as backend:
        first = backend.generate([_tile()], QUESTION, GenerateOptions(max_new_tokens=8))[0]
        llama = backend._llama
        evaluated = llama.input_ids[: llama.n_tokens].tolist()
        again = backend.generate([_tile()], QUESTION, GenerateOptions(max_new_tokens=8))[0]
        other = backend.generate([_tile(224, 252, seed=1)], QUESTION,
                                 GenerateOptions(max_new_tokens=8))[0]
        ids = {t: llama.tokenize(t.encode(), add_bos=False, special=True) for t in SPECIAL_TOKENS}
    assert all(len(i) == 1 for i in ids.values())  # the vocabulary holds Qwen's control tokens
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"):
        assert ids[token][0] in evaluated  # Qwen's template and libmtmd's image markers
    assert evaluated.count(ids["<|im_start|>"][0]) == 3  # system, user, assistant
    assert first.generated_tokens == 8 and first.text and first.extra["finish_reason"] == "length"
    assert first.text == again.text  # greedy
    assert other.generated_tokens == 8
    assert first.extra["vision"] == "libmtmd"
    # 112 x 168 px is 4 x 6 merged image tokens at max(4, 6) M-RoPE positions: the prompt's
    # token count holds all 24 (llama.cpp's n_tokens only the positions); ``evaluated`` also
    # holds the answer's tokens but the last
    positions = len(evaluated) - (first.generated_tokens - 1)
    assert first.prompt_tokens == positions + 4 * 6 - 6
    assert other.prompt_tokens == first.prompt_tokens + 8 * 9 - 4 * 6


def test_selftest_verdict_on_this_build(pair, tmp_path, monkeypatch):
    """Stock llama-cpp-python 0.3.36 (CPU): libmtmd's Qwen2.5-VL features are off by 1.79e-3
    (features up to 2.8): float16 im2col in its patch embedding and its float16 GELU table;
    the shapes and the window/M-RoPE layout agree (a layout error moves them by > 0.1)."""
    monkeypatch.setenv("GEOCHAT_CACHE", str(tmp_path))
    llama = llama_cpp.Llama(str(pair[0]), n_ctx=256, n_threads=2, verbose=False)
    try:
        verdict = selftest.libmtmd_verdict(llama.model, llama.n_embd(), PROJECTOR, use_gpu=True)
    finally:
        llama.close()
    assert verdict.projector == PROJECTOR and np.isfinite(verdict.max_error)
    assert verdict.max_error < 1e-2  # numerics, not a different graph
    if llama_cpp.__version__ == "0.3.36" and not llama_cpp.llama_supports_gpu_offload():
        assert not verdict.ok and verdict.max_error > selftest.TOLERANCE  # measured 1.79e-3
        assert f"by up to {verdict.max_error:.2g}" in verdict.message
    assert verdict.ok == (verdict.max_error <= selftest.TOLERANCE)
    assert selftest.cached_verdict(PROJECTOR, use_gpu=True) == verdict
    assert selftest.cached_verdict("mlp", use_gpu=True) is None  # cached per projector type


def test_a_selftest_libmtmd_cannot_run_is_reported_not_cached(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOCHAT_CACHE", str(tmp_path))
    llama = llama_cpp.Llama(str(pair[0]), n_ctx=256, n_threads=2, verbose=False)
    try:  # a projector 32 wide for a 64-wide text model: libmtmd refuses it
        verdict = selftest.libmtmd_verdict(llama.model, 32, PROJECTOR, use_gpu=True)
    finally:
        llama.close()
    assert not verdict.ok and verdict.max_error == float("inf")
    assert verdict.message.startswith("libmtmd failed: libmtmd could not load")
    assert selftest.cached_verdict(PROJECTOR, use_gpu=True) is None  # tried again next load


def _write_verdict(ok: bool, error: float, message: str) -> None:
    key = f"{PROJECTOR}|{selftest.build_id(True)}"
    verdict = {"ok": ok, "projector": PROJECTOR, "max_error": error,
               "build": selftest.build_id(True), "message": message}
    selftest.cache_file().write_text(json.dumps({key: verdict}), encoding="utf-8")


@pytest.mark.parametrize("ok,error", [(True, 5e-5), (False, 0.25)])
def test_backend_reports_what_the_cached_verdict_says(pair, tmp_path, monkeypatch, ok, error):
    monkeypatch.setenv("GEOCHAT_CACHE", str(tmp_path))
    message = "libmtmd agrees" if ok else "differ from Qwen's own by up to 0.25"
    _write_verdict(ok, error, message)
    with _backend(pair) as backend:
        generation = backend.generate([_tile()], QUESTION, GenerateOptions(max_new_tokens=2))[0]
    assert backend.vision == "libmtmd"  # both ways: the project has no own Qwen path
    assert backend.verdict.max_error == error  # the cached verdict, not a new run
    assert generation.extra["vision_max_error"] == error
    request = {"model": {"backend": "llama.cpp", "model_path": str(pair[0]),
                         "mmproj_path": str(pair[1])}, "family": "qwen2.5-vl"}
    status = model_status(request, None)["message"]  # the runtime's model status
    if ok:
        assert backend.vision_note == "" and "vision_warning" not in generation.extra
        assert status.endswith("is ready")
    else:
        assert backend.vision_note == message == generation.extra["vision_warning"]
        assert status.endswith(f"is ready; {message}")


def _prompt_logits(backend: LlamaCppBackend, tile: np.ndarray) -> tuple[np.ndarray, dict]:
    """The next-token logits after the prompt (one token generated: it is not evaluated)."""
    generation = backend.generate([tile], QUESTION, GenerateOptions(max_new_tokens=1))[0]
    llama = backend._llama
    logits = llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1)
    return np.ctypeslib.as_array(logits, shape=(llama.n_vocab(),)).copy(), generation.extra


def test_own_qwen_features_go_where_libmtmds_go(pair, tmp_path, monkeypatch):
    """vision "project": llama.cpp decodes the project's features with libmtmd's own image
    positions. Fed libmtmd's features, that path gives libmtmd's logits exactly; fed Qwen's
    exact ones, logits move by the features' 1.8e-3 difference only."""
    from geochat_qgis.core.vision.libmtmd import mtmd_embeddings
    from geochat_qgis.core.vision.qwen_mmproj import read_qwen_mmproj
    from geochat_qgis.core.vision.qwen_numpy import embed

    monkeypatch.setenv("GEOCHAT_CACHE", str(tmp_path))
    tile = _tile(224, 252, seed=2)
    settings = {"n_ctx": 1024, "n_threads": 2}
    with LlamaCppBackend(*pair, family="qwen2.5-vl",
                         settings=LlamaCppSettings(vision="libmtmd", **settings)) as theirs:
        reference, extra = _prompt_logits(theirs, tile)
        libmtmd_features = mtmd_embeddings(theirs._llama.model, pair[1], tile, 64, n_threads=2,
                                           use_gpu=True, flash_attn=False)
    assert extra["vision"] == "libmtmd" and theirs.verdict is None  # asked: no self-test
    with LlamaCppBackend(*pair, family="qwen2.5-vl",
                         settings=LlamaCppSettings(vision="project", **settings)) as ours:
        ours.load()
        exact = ours.qwen_encoder.embed(tile)
        assert np.array_equal(exact, embed(read_qwen_mmproj(pair[1]), tile))
        monkeypatch.setattr(ours.qwen_encoder, "embed", lambda image: libmtmd_features)
        same, extra = _prompt_logits(ours, tile)
        monkeypatch.setattr(ours.qwen_encoder, "embed", lambda image: exact)
        moved, _ = _prompt_logits(ours, tile)
        assert ours._handler._mtmd_cpp.decoded == 2
        resized = ours.generate([_tile(100, 150)], QUESTION, GenerateOptions(max_new_tokens=2))
        assert ours._handler._mtmd_cpp.decoded == 2  # 100x150 would be resized: libmtmd's
    assert extra["vision"].startswith("the project's Qwen2.5-VL encoder")
    assert "vision_warning" not in extra
    assert resized[0].extra["vision"].startswith("libmtmd (the tile needs a resize")
    assert float(np.abs(same - reference).max()) < 1e-5  # measured 0.0: the same decode
    change = float(np.abs(moved - reference).max())  # measured 1.9e-3 (logits up to 15.7)
    assert 0 < change < 0.1 * float(np.abs(reference).max())
