"""GeoPixel's greedy decoding with a KV cache against GeoPixel's cache-less loop (arrays made with
GeoPixel's modeling_internlm2 by bench/geopixel_text_reference.py): tokens, every step's logits and the
[SEG] hidden states; plus the stop rule, cancel, callbacks and batching."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from geochat_qgis.core.cancel import CancelToken
from geochat_qgis.core.errors import Cancelled, ModelError
from geochat_qgis.core.models.geopixel.tokenizer import load_tokenizer

torch = pytest.importorskip("torch")
from geochat_qgis.core.models.geopixel.decoder import InternLM2Config, build_decoder, load_state  # noqa: E402
from geochat_qgis.core.models.geopixel.generate import generate, generate_batch, reply_text  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "geopixel"


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(DATA / "text_reference.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DATA / "tiny_tokenizer")


def decoder_for(ref, case: str = "greedy"):
    hf_config = json.loads(str(ref["config_json"]))
    if case == "greedy_ntk":
        hf_config["max_position_embeddings"] = hf_config["ntk_max_position_embeddings"]["greedy"]
    tensors = {k[len("weight:"):]: torch.from_numpy(v) for k, v in ref.items() if k.startswith("weight:")}
    decoder = build_decoder(InternLM2Config.from_checkpoint(hf_config, {k: v.shape for k, v in tensors.items()}))
    load_state(decoder, tensors)
    rows = hf_config["prompt_rows"]
    embeds, im_mask = ref["forward_embeds"][:, :rows], ref["forward_im_mask"][:, :rows]
    return decoder, torch.from_numpy(embeds), torch.from_numpy(im_mask)


@pytest.mark.parametrize("case", ["greedy", "greedy_ntk"])
def test_greedy_tokens_logits_and_seg_states_match_geopixel(ref, tok, case):
    decoder, embeds, im_mask = decoder_for(ref, case)
    expected = ref[f"{case}_tokens"].tolist()
    assert tok.eos_id not in expected
    seg = Counter(expected[:-1]).most_common(1)[0][0]  # a token fed back more than once
    out = generate(decoder, tok, embeds, im_mask, len(expected), seg_id=seg, return_logits=True)
    assert out.token_ids == expected and out.stop == "length"
    assert np.abs(out.step_logits.numpy() - ref[f"{case}_step_logits"]).max() < 1e-5
    width = embeds.shape[1]
    rows = [width + j for j, t in enumerate(expected[:-1]) if t == seg]  # evaluate's output_ids[:, 1:-1]
    assert len(rows) == 3
    want = ref[f"{case}_last_hidden"][rows]
    assert out.seg_hidden.shape == want.shape
    assert np.abs(out.seg_hidden.numpy() - want).max() < 1e-5
    assert out.text == reply_text(tok, expected)
    for token in {expected[j] for j in (0, 6, 7, 13, 17)} - {seg}:  # more fed positions, before and after NTK
        rows = [width + j for j, t in enumerate(expected[:-1]) if t == token]
        got = generate(decoder, tok, embeds, im_mask, len(expected), seg_id=token).seg_hidden
        assert np.abs(got.numpy() - ref[f"{case}_last_hidden"][rows]).max() < 1e-5


def test_a_seg_generated_last_gives_no_mask_query(ref, tok):
    decoder, embeds, im_mask = decoder_for(ref)
    expected = ref["greedy_tokens"].tolist()
    k = next(i for i in range(1, len(expected)) if expected[i] not in expected[:i])
    cut = generate(decoder, tok, embeds, im_mask, k + 1, seg_id=expected[k])
    assert cut.token_ids == expected[:k + 1] and cut.seg_hidden.shape[0] == 0
    longer = generate(decoder, tok, embeds, im_mask, k + 2, seg_id=expected[k])
    assert longer.seg_hidden.shape[0] == 1


def test_prompt_tokens_never_count_as_seg(ref, tok):
    decoder, _, _ = decoder_for(ref)
    seg = 7
    ids = torch.tensor([[tok.bos_id, seg, seg, 5, 6]])
    out = generate(decoder, tok, decoder.embed(ids), torch.zeros(1, 5, dtype=torch.bool), 3, seg_id=seg)
    assert seg not in out.token_ids[:-1] and out.seg_hidden.shape[0] == 0


def test_stops_after_the_eos_only(ref, tok):
    decoder, embeds, im_mask = decoder_for(ref)
    expected = ref["greedy_tokens"].tolist()
    stop = expected[4]
    first = expected.index(stop)
    out = generate(decoder, tok, embeds, im_mask, 12, eos_id=stop)
    assert out.token_ids == expected[:first + 1] and out.stop == "eos"


def test_cancel_and_per_token_callback(ref, tok):
    decoder, embeds, im_mask = decoder_for(ref)
    cancel = CancelToken()
    seen = []

    def on_token(answer: int, step: int, token: int) -> None:
        seen.append((answer, step, token))
        if step == 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        generate(decoder, tok, embeds, im_mask, 12, cancel=cancel, on_token=on_token)
    assert seen == [(0, i, t) for i, t in enumerate(ref["greedy_tokens"][:3].tolist())]
    with pytest.raises(ModelError, match="max_new_tokens"):
        generate(decoder, tok, embeds, im_mask, 0)


def test_batch_of_different_prompt_lengths_equals_one_by_one(ref, tok):
    decoder, embeds, im_mask = decoder_for(ref)
    short_embeds, short_mask = embeds[:, :23], im_mask[:, :23]
    together = generate_batch(decoder, tok, [(embeds, im_mask), (short_embeds, short_mask)], 10, return_logits=True)
    alone = [generate(decoder, tok, e, m, 10, return_logits=True) for e, m in
             ((embeds, im_mask), (short_embeds, short_mask))]
    for both, one in zip(together, alone):
        assert both.token_ids == one.token_ids
        assert torch.allclose(both.step_logits, one.step_logits, atol=1e-5, rtol=0)
    assert together[0].token_ids != together[1].token_ids


def test_reply_is_decoded_as_geopixel_does(tok):
    ids = tok.encode("A <p> roof </p> [SEG].[UNUSED_TOKEN_145]") + [tok.eos_id]
    assert reply_text(tok, ids) == "A <p> roof </p> [SEG] ."  # 4.33 joins added tokens with spaces
