"""GeoPixel's tokenizer and prompt against transformers 4.33.2 running GeoPixel's own
tokenization_internlm2.py and interleav_wrap_chat (tests/data/geopixel/tokenizer_reference.json, made by
bench/geopixel_text_reference.py from the tiny tokenizer in tests/data/geopixel/tiny_tokenizer), and
the tiny-tokenizer writer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from geochat_qgis.core.errors import ModelError
from geochat_qgis.core.models.geopixel.tokenizer import (
    ADDED_TOKENS, PUBLISHED_SPECIAL_TOKENS_MAP, TOKENIZER_FILES, UNUSED_TOKENS, clean_up_tokenization,
    load_tokenizer, write_tiny_tokenizer)

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "geopixel"
FOLDER = DATA / "tiny_tokenizer"


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads((DATA / "tokenizer_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FOLDER)


def test_vocabulary_and_special_ids_match_transformers_433(tok, ref):
    assert len(tok) == ref["len"]
    assert (tok.bos_id, tok.eos_id) == (ref["bos"], ref["eos"])
    assert sorted(tok.special_ids) == ref["special_ids"]
    assert tok.added == ref["added"]
    pieces = tok.sp.get_piece_size()
    assert [tok.token_to_id(t) for t in ADDED_TOKENS] == [pieces, pieces + 1, pieces + 2]


def test_encode_matches_transformers_433_on_every_reference_string(tok, ref):
    assert len(ref["encode"]) > 200
    for case in ref["encode"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.encode(case["text"], add_bos=True) == case["ids_bos"], case["text"]


def test_added_tokens_are_split_out_and_strip_neighbouring_whitespace(tok):
    seg, p, end_p = (tok.token_to_id(t) for t in ("[SEG]", "<p>", "</p>"))
    assert tok.encode("a <p> roof </p> [SEG] .") == tok.encode("a<p>roof</p>[SEG].")
    assert tok.encode("<p>x</p>[SEG]")[0] == p and tok.encode("<p>x</p>[SEG]")[-2:] == [end_p, seg]
    unused = tok.encode("[UNUSED_TOKEN_145]")  # a SentencePiece user piece: encoded by SentencePiece
    assert tok.token_to_id("[UNUSED_TOKEN_145]") in unused


def test_decode_matches_transformers_433(tok, ref):
    assert len(ref["decode"]) > 300
    for case in ref["decode"]:
        assert tok.decode(case["ids"]) == case["skip"], case["ids"]
        assert tok.decode(case["ids"], skip_special_tokens=False) == case["keep"], case["ids"]


def test_decode_keeps_seg_and_phrase_marks_with_single_spaces(tok):
    ids = [tok.bos_id, *tok.encode("The<p>red roof</p>[SEG]is here."), tok.eos_id]
    assert tok.decode(ids) == "The <p> red roof </p> [SEG] is here."
    assert clean_up_tokenization("it 's here , ok .") == "it's here, ok."


def test_prompt_layout_matches_interleav_wrap_chat(tok, ref):
    torch = pytest.importorskip("torch")
    from geochat_qgis.core.models.geopixel.prompt import assemble_prompt, build_prompt_ids

    embedding = torch.nn.Embedding(len(tok), 1)
    with torch.no_grad():
        embedding.weight.copy_(torch.arange(len(tok), dtype=torch.float32)[:, None])
    assert len(ref["prompts"]) >= 40
    for case in ref["prompts"]:
        pieces = build_prompt_ids(tok, case["query"], [tuple(t) for t in case["history"]], case["meta"])
        embeds, im_mask = assemble_prompt(embedding, pieces, torch.full((5, 1), -1.0))
        assert embeds[0, :, 0].round().long().tolist() == case["ids"], case
        assert im_mask[0].long().tolist() == case["im_mask"], case
    plain = build_prompt_ids(tok, "Describe the image.")
    assert plain[0] == [tok.bos_id] and len(plain) == 2  # BOS, image, then the chat text


def test_too_long_prompt_is_refused_not_cut(tok):
    torch = pytest.importorskip("torch")
    from geochat_qgis.core.models.geopixel.prompt import assemble_prompt, build_prompt_ids

    pieces = build_prompt_ids(tok, "q")
    embed = torch.nn.Embedding(len(tok), 4)
    with pytest.raises(ModelError, match="smaller tile"):
        assemble_prompt(embed, pieces, torch.zeros(16384, 4))
    with pytest.raises(ModelError, match="history turn"):
        build_prompt_ids(tok, "q", history=[("only a question",)])


def test_write_tiny_tokenizer_writes_the_published_layout(tmp_path):
    size = write_tiny_tokenizer(tmp_path / "a")
    write_tiny_tokenizer(tmp_path / "b")
    for name in TOKENIZER_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    tok = load_tokenizer(tmp_path / "a")
    pieces = tok.sp.get_piece_size()
    assert size == pieces + 3
    assert [tok.sp.id_to_piece(pieces - 6 + i) for i in range(6)] == list(UNUSED_TOKENS)
    assert (tok.sp.id_to_piece(0), tok.bos_id, tok.eos_id) == ("<unk>", 1, 2)
    smap = json.loads((tmp_path / "a" / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert smap == PUBLISHED_SPECIAL_TOKENS_MAP
    assert json.loads((tmp_path / "a" / "added_tokens.json").read_text()) == {
        "[SEG]": pieces, "<p>": pieces + 1, "</p>": pieces + 2}
    assert not (tmp_path / "a" / "tokenization_internlm2.py").exists()
    text = "[UNUSED_TOKEN_146]user\nSegment the roofs, please![UNUSED_TOKEN_145]\n"
    assert tok.decode(tok.encode(text)) == text


def test_broken_tokenizer_folders_are_named(tmp_path):
    with pytest.raises(ModelError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[SEG]": 5000}))
    with pytest.raises(ModelError, match="added_tokens.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "added_tokens.json").write_text("{not json")
    with pytest.raises(ModelError, match="added_tokens.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "added_tokens.json").unlink()
    tok = load_tokenizer(tmp_path)
    with pytest.raises(ModelError, match="Token id 100000"):
        tok.decode([100000])
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="SentencePiece"):
        load_tokenizer(tmp_path)
