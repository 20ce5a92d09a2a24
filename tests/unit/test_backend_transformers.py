"""transformers on the CPU with the project's tiny random GeoChat (a converted LLaVA folder)."""
from __future__ import annotations

import numpy as np
import pytest

from geochat_qgis.core.backends.base import CancelToken, Conversation, GenerateOptions
from geochat_qgis.core.backends.factory import resolve_spec
from geochat_qgis.core.backends.transformers_backend import (TransformersBackend,
                                                             TransformersSettings)
from geochat_qgis.core.errors import Cancelled, ModelError

pytest.importorskip("transformers")

REFER = "[refer] Give me the location of <p> airplane </p>"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from geochat_qgis.core.weights.tiny import build_tiny_geochat

    return build_tiny_geochat(tmp_path_factory.mktemp("tiny") / "hf", "hf")


@pytest.fixture(scope="module")
def backend(tiny_hf):
    with TransformersBackend(tiny_hf, settings=TransformersSettings(batch_size=2)) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def tiles():
    rng = np.random.default_rng(11)
    return [rng.integers(0, 256, (504, 504, 3), dtype=np.uint8) for _ in range(2)]


def test_cpu_float32_and_sdpa(backend):
    import torch

    assert backend.device == "cpu" and backend.model.dtype == torch.float32
    assert backend.model.config._attn_implementation == "sdpa"
    assert resolve_spec(str(backend.path)).kind == "transformers"


def test_batch_of_two_equals_one_at_a_time(backend, tiles):
    options = GenerateOptions(max_new_tokens=16)
    batched = backend.generate(tiles, Conversation.single(REFER), options)
    single = [backend.generate([tile], Conversation.single(REFER), options)[0] for tile in tiles]
    assert [g.text for g in batched] == [g.text for g in single]
    assert batched[0].text != batched[1].text  # the two tiles really were looked at
    assert batched[0].prompt_tokens == single[0].prompt_tokens > 1296
    assert all(0 < g.generated_tokens <= 16 for g in batched)


def test_streaming_reports_each_row(backend, tiles):
    pieces: dict[int, list[str]] = {0: [], 1: []}
    result = backend.generate(tiles, Conversation.single(REFER), GenerateOptions(
        max_new_tokens=12, on_token=lambda index, piece: pieces[index].append(piece)))
    for index in (0, 1):
        assert len(pieces[index]) > 1
        assert "".join(pieces[index]).strip() == result[index].text


def test_cancel_stops_generation(backend, tiles):
    cancel = CancelToken()
    seen: list[str] = []

    def on_token(index: int, piece: str) -> None:
        seen.append(piece)
        cancel.cancel()

    with pytest.raises(Cancelled):
        backend.generate(tiles[:1], Conversation.single(REFER),
                         GenerateOptions(max_new_tokens=200, on_token=on_token, cancel=cancel))
    assert 1 <= len(seen) <= 2


def test_multi_turn_conversation_runs(backend, tiles):
    from geochat_qgis.core.backends.base import Turn

    conversation = Conversation([Turn("What is this?", "An airport."), Turn(REFER)])
    result = backend.generate(tiles[:1], conversation, GenerateOptions(max_new_tokens=4))
    single = backend.generate(tiles[:1], Conversation.single(REFER), GenerateOptions(max_new_tokens=4))
    assert result[0].prompt_tokens > single[0].prompt_tokens


def test_gguf_or_missing_folder_is_explained(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="GGUF file: use --backend llama.cpp"):
        TransformersBackend(tmp_path / "model.gguf").load()
    with pytest.raises(ModelError, match="no config.json"):
        TransformersBackend(tmp_path).load()


def test_prompts_of_a_tile_share_one_prefill(backend, tiles):
    """Issue 16: the prefix up to the image is evaluated once for the tiles of a batch; each
    prompt continues from its cache and answers what a fresh evaluation answers, greedy."""
    from geochat_qgis.core.backends.base import Turn
    from geochat_qgis.core.families import get_family

    family = get_family("geochat")
    prompts = [family.build_prompt("refer", phrase) for phrase in ("building", "road", "car")]
    conversations = [Conversation.single(text) for text in prompts]
    conversations.append(Conversation([Turn(prompts[0], "a roof."), Turn("and the road?")]))
    options = GenerateOptions(max_new_tokens=6)
    backend.prefix.drop()
    prefills = backend.prefix.prefills
    shared = [backend.generate(tiles, conversation, options) for conversation in conversations]
    assert backend.prefix.prefills == prefills + 1
    first, *rest = shared
    assert all(g.extra["evaluated_tokens"] == g.prompt_tokens for g in first)
    assert all(g.extra["evaluated_tokens"] < 60 < 1296 < g.prompt_tokens for r in rest for g in r)
    fresh = []
    for conversation in conversations:
        backend.prefix.drop()
        fresh.append(backend.generate(tiles, conversation, options))
    assert [[g.text for g in r] for r in shared] == [[g.text for g in r] for r in fresh]
    backend.generate(tiles[:1], conversations[0], options)  # other tiles: a new prefill
    assert backend.prefix.prefills == prefills + 2 + len(conversations)
