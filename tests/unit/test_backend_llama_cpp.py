"""llama.cpp in process with the project's tiny random GeoChat GGUF (text model + mmproj)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from geochat_qgis.core.backends.base import CancelToken, Conversation, GenerateOptions, Turn
from geochat_qgis.core.backends.factory import BackendCache, BackendSpec, resolve_spec
from geochat_qgis.core.backends.grammar import REFER_GRAMMAR, box_grammar
from geochat_qgis.core.backends.llama_cpp import LlamaCppBackend, LlamaCppSettings
from geochat_qgis.core.errors import BackendError, Cancelled, ModelError
from geochat_qgis.core.families import get_family
from geochat_qgis.core.families.llava_v1 import SYSTEM

pytest.importorskip("llama_cpp")

REFER = "[refer] Give me the location of <p> car </p>"


@pytest.fixture(scope="module")
def backend(tiny_gguf):
    with LlamaCppBackend(tiny_gguf) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def tiles():
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (504, 504, 3), dtype=np.uint8) for _ in range(2)]


def test_prompt_is_llava_v1_with_the_image_where_image_stands(backend, tiles):
    """The evaluated tokens are GeoChat's text around 1296 image positions, nothing else."""
    backend.generate(tiles[:1], Conversation.single(REFER), GenerateOptions(max_new_tokens=1))
    llama = backend._llama
    before = llama.tokenize(f"{SYSTEM} USER: ".encode(), add_bos=True, special=True)
    after = llama.tokenize(f"\n{REFER} ASSISTANT:".encode(), add_bos=False, special=True)
    prompt_length = len(before) + 1296 + len(after)
    evaluated = llama.input_ids[:prompt_length].tolist()
    assert evaluated[: len(before)] == before
    assert evaluated[-len(after):] == after
    generation = backend.generate(tiles[:1], Conversation.single(REFER),
                                  GenerateOptions(max_new_tokens=4))[0]
    assert generation.prompt_tokens == prompt_length


def test_greedy_stream_matches_text_and_is_deterministic(backend, tiles):
    pieces: list[tuple[int, str]] = []
    options = GenerateOptions(max_new_tokens=24, on_token=lambda i, p: pieces.append((i, p)))
    first = backend.generate(tiles, Conversation.single(REFER), options)
    again = backend.generate(tiles, Conversation.single(REFER), GenerateOptions(max_new_tokens=24))
    assert [g.text for g in first] == [g.text for g in again]
    assert first[0].generated_tokens == 24 and first[0].extra["finish_reason"] == "length"
    for index in (0, 1):
        streamed = "".join(p for i, p in pieces if i == index)
        assert streamed.strip() == first[index].text


def test_cancel_between_tokens_then_backend_still_works(backend, tiles):
    cancel = CancelToken()
    seen: list[str] = []

    def on_token(index: int, piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            cancel.cancel()

    with pytest.raises(Cancelled):
        backend.generate(tiles[:1], Conversation.single(REFER),
                         GenerateOptions(max_new_tokens=200, on_token=on_token, cancel=cancel))
    assert len(seen) == 3
    after = backend.generate(tiles[:1], Conversation.single(REFER),
                             GenerateOptions(max_new_tokens=8))
    assert after[0].generated_tokens == 8


def test_refer_grammar_answers_always_parse_into_boxes(backend, tiles):
    assert box_grammar("geochat", "refer") == REFER_GRAMMAR
    options = GenerateOptions(max_new_tokens=256, grammar=REFER_GRAMMAR)
    family = get_family("geochat")
    for generation in backend.generate(tiles, Conversation.single(REFER), options):
        answer = family.parse(generation.text, 504, default_label="car")
        assert answer.detections and not answer.problems, generation.text
        assert generation.extra["finish_reason"] == "stop"  # the bounded grammar ended it


def test_stop_string_cuts_the_answer(backend, tiles):
    full = backend.generate(tiles[:1], Conversation.single(REFER),
                            GenerateOptions(max_new_tokens=40, grammar=REFER_GRAMMAR))[0].text
    cut = backend.generate(tiles[:1], Conversation.single(REFER),
                           GenerateOptions(max_new_tokens=40, grammar=REFER_GRAMMAR,
                                           stop=["}"]))[0]
    assert cut.text == full[: full.index("}")]
    assert cut.extra["finish_reason"] == "stop"


def test_load_is_cached(tiny_gguf):
    cache = BackendCache()
    spec = BackendSpec("llama.cpp", str(tiny_gguf))
    first = cache.get(spec)
    llama = first._llama
    first.load()
    assert cache.get(BackendSpec("llama.cpp", str(tiny_gguf))) is first
    assert first._llama is llama
    cache.clear()
    assert first._llama is None


def test_model_rewritten_at_the_same_path_is_loaded_again(tiny_gguf, tiles, tmp_path):
    """A model converted again to the same folder is not answered from the old weights."""
    from geochat_qgis.core.weights.tiny import build_tiny_geochat

    folder = tmp_path / "model"
    shutil.copytree(tiny_gguf, folder)
    cache = BackendCache()
    spec = BackendSpec("llama.cpp", str(folder))
    options = GenerateOptions(max_new_tokens=12)
    old = cache.get(spec)
    old_text = old.generate(tiles[:1], Conversation.single(REFER), options)[0].text
    assert cache.get(spec) is old  # unchanged files: the loaded model is reused
    rebuilt = build_tiny_geochat(tmp_path / "seed1", "gguf", seed=1)
    for name in ("model.gguf", "mmproj.gguf"):
        shutil.copyfile(rebuilt / name, folder / name)
    new = cache.get(spec)
    assert new is not old and old._llama is None  # the stale one was closed
    new_text = new.generate(tiles[:1], Conversation.single(REFER), options)[0].text
    with LlamaCppBackend(rebuilt) as fresh:
        expected = fresh.generate(tiles[:1], Conversation.single(REFER), options)[0].text
    assert new_text == expected != old_text
    cache.clear()


def test_resolve_spec_from_folder_file_and_mmproj(tiny_gguf):
    assert resolve_spec(str(tiny_gguf)).kind == "llama.cpp"
    spec = resolve_spec(str(tiny_gguf / "model.gguf"), mmproj=str(tiny_gguf / "mmproj.gguf"))
    assert (spec.kind, spec.family, spec.mmproj) == ("llama.cpp", "geochat",
                                                     str(tiny_gguf / "mmproj.gguf"))


def test_small_context_is_refused(tiny_gguf):
    with pytest.raises(BackendError, match="too small for GeoChat"):
        LlamaCppBackend(tiny_gguf, settings=LlamaCppSettings(n_ctx=1024)).load()


# -- bad model files: a message that says what is wrong ---------------------------------------

def test_wrong_file_type(data_dir):
    with pytest.raises(ModelError, match="not a GGUF file.*--backend transformers"):
        LlamaCppBackend(data_dir / "cogeo.tif").load()


def test_missing_mmproj(tiny_gguf, tmp_path):
    shutil.copy(tiny_gguf / "model.gguf", tmp_path / "model.gguf")
    with pytest.raises(ModelError, match="No mmproj.*--mmproj"):
        LlamaCppBackend(tmp_path / "model.gguf").load()


def test_mmproj_given_as_model(tiny_gguf):
    with pytest.raises(ModelError, match="vision projector.*--mmproj"):
        LlamaCppBackend(tiny_gguf / "mmproj.gguf").load()


def write_foreign_mmproj(path):
    """A real mmproj GGUF header for a model with 4096-wide embeddings (a 7B's projector)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_uint32("clip.vision.image_size", 504)
    writer.add_uint32("clip.vision.projection_dim", 4096)
    writer.add_tensor("mm.2.weight", np.zeros((4096, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_mismatched_mmproj(tiny_gguf, tmp_path):
    other = write_foreign_mmproj(tmp_path / "mmproj-other.gguf")
    with pytest.raises(ModelError, match="does not belong.*4096.*64"):
        LlamaCppBackend(tiny_gguf / "model.gguf", other).load()


@pytest.mark.parametrize("keep", [0.5, 0.002])
def test_truncated_gguf(tiny_gguf, tmp_path, keep):
    data = (tiny_gguf / "model.gguf").read_bytes()
    (tmp_path / "model.gguf").write_bytes(data[: int(len(data) * keep)])
    shutil.copy(tiny_gguf / "mmproj.gguf", tmp_path / "mmproj.gguf")
    with pytest.raises(ModelError, match="truncated|damaged"):
        LlamaCppBackend(tmp_path).load()


PHRASES = ("building", "road", "car", "ship")


def test_prompts_of_a_tile_continue_from_its_image_prefix(backend, tiles):
    """Issue 16: the tile is encoded once and its prefix (system text, image) evaluated once;
    each further prompt pays only its own text, and answers what a fresh evaluation answers."""
    prompts = [get_family("geochat").build_prompt("refer", phrase) for phrase in PHRASES]
    options = GenerateOptions(max_new_tokens=12)
    backend.evaluator.forget()
    backend.encoder.clear()
    encoded = backend.encoder.encoded
    shared = [backend.generate(tiles[:1], Conversation.single(text), options)[0]
              for text in prompts]
    assert backend.encoder.encoded == encoded + 1
    assert shared[0].extra["evaluated_tokens"] == shared[0].prompt_tokens
    for generation in shared[1:]:  # less than the image alone: no image position again
        assert 0 < generation.extra["evaluated_tokens"] < 40 < 1296 < generation.prompt_tokens
    fresh = []
    for text in prompts:
        backend.evaluator.forget()
        fresh.append(backend.generate(tiles[:1], Conversation.single(text), options)[0])
        assert fresh[-1].extra["evaluated_tokens"] == fresh[-1].prompt_tokens
    assert [g.text for g in shared] == [g.text for g in fresh]


def test_follow_up_turn_pays_only_itself_and_equals_a_fresh_evaluation(backend, tiles):
    """A conversation continues from the evaluated first turn; another tile starts over."""
    options = GenerateOptions(max_new_tokens=10)
    backend.evaluator.forget()
    first = backend.generate(tiles[:1], Conversation.single(REFER), options)[0]
    follow = Conversation([Turn(REFER, first.text), Turn("[refer] and the road?")])
    second = backend.generate(tiles[:1], follow, options)[0]
    assert second.prompt_tokens > first.prompt_tokens
    assert second.extra["evaluated_tokens"] < 0.1 * first.extra["evaluated_tokens"]
    backend.evaluator.forget()
    again = backend.generate(tiles[:1], follow, options)[0]
    assert again.extra["evaluated_tokens"] == again.prompt_tokens
    assert again.text == second.text
    other = backend.generate(tiles[1:], follow, options)[0]  # another image: from the image on
    assert other.extra["evaluated_tokens"] > 1296 and other.extra["image_encoded"]
