"""Greedy decoding as GeoPixel's ``evaluate`` does it, with a KV cache instead of re-running the prompt.

GeoPixel (transformers 4.33 ``generate``, no cache) re-runs ``prompt + generated tokens`` at every step
and takes the argmax of the float32 logits of the last row; it stops after the EOS (``</s>``, the only
stop id) or after ``max_new_tokens`` tokens. Its reply is ``decode([BOS] + tokens,
skip_special_tokens=True)`` without ``[UNUSED_TOKEN_145]``. The mask queries are the normed last-layer
hidden states at the positions where ``[SEG]`` is the INPUT token: generated tokens that were fed back,
so a ``[SEG]`` generated last (cut by ``max_new_tokens``) gives none, and a ``[SEG]`` in the prompt
gives none either.

Here the prompt is run once into a KV cache and each new token once. When dynamic NTK RoPE would
change the base (past ``max_position_embeddings``) GeoPixel's numbers depend on re-running the whole
sequence with the new base each step; those steps are re-run in full here too, and the [SEG] states
are then read from the last full run, as GeoPixel reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ...cancel import CancelToken
from ...errors import ModelError
from .decoder import InternLM2Decoder
from .tokenizer import InternLM2Tokenizer

UNUSED_END = "[UNUSED_TOKEN_145]"


@dataclass
class Generation:
    """One answer: generated ids (EOS included when reached), GeoPixel's reply text, why it stopped
    ("eos" or "length"), the [SEG] queries (n_seg, hidden) and, when asked, the logits of every step
    (n_steps, vocab) in float32."""

    token_ids: list[int]
    text: str
    stop: str
    seg_hidden: torch.Tensor
    step_logits: Optional[torch.Tensor] = None


def reply_text(tokenizer: InternLM2Tokenizer, token_ids: Sequence[int]) -> str:
    """GeoPixel's reply: ``decode([BOS] + ids, skip_special_tokens=True)`` minus [UNUSED_TOKEN_145]."""
    return tokenizer.decode([tokenizer.bos_id, *token_ids], skip_special_tokens=True).replace(UNUSED_END, "")


def _left_pad(prompts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                           Optional[torch.Tensor]]:
    """(embeds (b, L, h), im_mask (b, L), valid (b, L) or None when all prompts have one length)."""
    lengths = [embeds.shape[-2] for embeds, _ in prompts]
    width = max(lengths)
    rows, masks, valid = [], [], []
    for (embeds, im_mask), length in zip(prompts, lengths):
        embeds = embeds.reshape(length, -1)
        pad = width - length
        rows.append(torch.cat([embeds.new_zeros(pad, embeds.shape[1]), embeds]))
        masks.append(torch.cat([im_mask.new_zeros(pad), im_mask.reshape(length)]))
        valid.append(torch.arange(width, device=embeds.device) >= pad)
    same = len(set(lengths)) == 1
    return torch.stack(rows), torch.stack(masks).bool(), None if same else torch.stack(valid)


def generate_batch(decoder: InternLM2Decoder, tokenizer: InternLM2Tokenizer,
                   prompts: Sequence[tuple[torch.Tensor, torch.Tensor]], max_new_tokens: int, *,
                   seg_id: Optional[int] = None, eos_id: Optional[int] = None, return_logits: bool = False,
                   cancel: Optional[CancelToken] = None,
                   on_token: Optional[Callable[[int, int, int], None]] = None) -> list[Generation]:
    """Greedy answers for several prompts at once (left-padded; each stops on its own).

    ``prompts``: (embeds (1, L, hidden), im_mask (1, L)) per answer, as :func:`prompt.assemble_prompt`
    makes them. ``seg_id`` / ``eos_id`` default to the tokenizer's ``[SEG]`` / ``</s>``. ``cancel`` is
    checked before every step; ``on_token(answer, step, token_id)`` is called for every new token.
    """
    if max_new_tokens < 1:
        raise ModelError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if not prompts:
        return []
    seg = tokenizer.token_to_id("[SEG]") if seg_id is None else seg_id
    eos = tokenizer.eos_id if eos_id is None else eos_id
    embeds, im_mask, valid = _left_pad(prompts)
    batch, width, _ = embeds.shape
    device = embeds.device
    config = decoder.config
    full_from = config.max_position_embeddings if config.rope_scaling_type == "dynamic" else None
    tokens: list[list[int]] = [[] for _ in range(batch)]
    seg_rows: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    logits_rows: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    done = [False] * batch
    full_hidden: Optional[torch.Tensor] = None
    cache = decoder.new_cache(batch, width + max_new_tokens)
    fed = torch.empty(batch, 0, dtype=torch.long, device=device)
    with torch.no_grad():
        for step in range(max_new_tokens):
            if cancel is not None:
                cancel.raise_if_cancelled()
            total = width + step
            if full_from is not None and total > full_from:
                full_hidden = _full_run(decoder, embeds, im_mask, valid, fed, cancel)
                hidden = full_hidden[:, -1:]
            elif step == 0:
                hidden = decoder(embeds, im_mask, cache, valid, cancel)[:, -1:]
            else:
                step_valid = None if valid is None else torch.cat(
                    [valid, torch.ones(batch, step, dtype=torch.bool, device=device)], dim=1)
                hidden = decoder(decoder.embed(fed[:, -1:]), None, cache, step_valid)
                for row in range(batch):
                    if not done[row] and int(fed[row, -1]) == seg:
                        seg_rows[row].append(hidden[row, 0])
            logits = decoder.logits(hidden[:, 0])
            chosen = logits.argmax(-1)
            for row in range(batch):
                if done[row]:
                    continue
                token = int(chosen[row])
                tokens[row].append(token)
                if return_logits:
                    logits_rows[row].append(logits[row])
                if on_token is not None:
                    on_token(row, step, token)
                done[row] = token == eos
            fed = torch.cat([fed, chosen[:, None]], dim=1)
            if all(done):
                break
    results = []
    for row in range(batch):
        ids = tokens[row]
        if full_hidden is not None:
            seg_rows[row] = _seg_from_full(full_hidden[row], width, ids, seg)
        hidden_size = embeds.shape[-1]
        seg_hidden = torch.stack(seg_rows[row]) if seg_rows[row] else embeds.new_zeros(0, hidden_size)
        results.append(Generation(
            token_ids=ids, text=reply_text(tokenizer, ids), stop="eos" if ids[-1] == eos else "length",
            seg_hidden=seg_hidden.clone(),
            step_logits=torch.stack(logits_rows[row]).clone() if return_logits else None))
    return results


def generate(decoder: InternLM2Decoder, tokenizer: InternLM2Tokenizer, embeds: torch.Tensor,
             im_mask: torch.Tensor, max_new_tokens: int, **options) -> Generation:
    """One greedy answer; see :func:`generate_batch` for the options."""
    return generate_batch(decoder, tokenizer, [(embeds, im_mask)], max_new_tokens, **options)[0]


def _full_run(decoder: InternLM2Decoder, embeds: torch.Tensor, im_mask: torch.Tensor,
              valid: Optional[torch.Tensor], fed: torch.Tensor, cancel: Optional[CancelToken]) -> torch.Tensor:
    """GeoPixel's step: the whole ``prompt + fed tokens`` without a cache (normed hidden states)."""
    batch, steps = fed.shape
    if steps:
        embeds = torch.cat([embeds, decoder.embed(fed)], dim=1)
        im_mask = torch.cat([im_mask, im_mask.new_zeros(batch, steps)], dim=1)
        if valid is not None:
            valid = torch.cat([valid, valid.new_ones(batch, steps)], dim=1)
    return decoder(embeds, im_mask, None, valid, cancel)


def _seg_from_full(hidden: torch.Tensor, width: int, ids: Sequence[int], seg: int) -> list[torch.Tensor]:
    """The [SEG] rows of the last full run: fed tokens ``ids[:-1]`` sit at ``width + j``."""
    return [hidden[width + j] for j, token in enumerate(ids[:-1]) if token == seg]
