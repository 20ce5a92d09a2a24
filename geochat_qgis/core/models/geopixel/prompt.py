"""GeoPixel's prompt for one image, as ``interleav_wrap_chat`` builds it in IXC-2.5's code.

The text is ``[UNUSED_TOKEN_146]user\\n{q}[UNUSED_TOKEN_145]\\n[UNUSED_TOKEN_146]assistant\\n{a}
[UNUSED_TOKEN_145]\\n`` for each earlier turn, then ``[UNUSED_TOKEN_146]user\\n{query}
[UNUSED_TOKEN_145]\\n[UNUSED_TOKEN_146]assistant\\n`` (no system turn: GeoPixel's ``meta_instruction``
is empty). ``<ImageHere>`` is put in front unless the text already holds one; the text is split at
``<ImageHere>`` and the image embeddings go after the first part. The first part is tokenized WITH
the BOS (for an image-first prompt it is just ``[BOS]``), every later non-empty part without it.
``im_mask`` is set on the image rows only. A prompt longer than ``max_length`` (16384 in GeoPixel,
which silently cuts it there, losing the question) is refused here.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ...errors import ModelError
from .tokenizer import InternLM2Tokenizer

IMAGE_PLACEHOLDER = "<ImageHere>"
MAX_LENGTH = 16384  # interleav_wrap_chat's default max_length (evaluate does not pass one)


def prompt_text(query: str, history: Sequence[tuple[str, str]] = (), meta_instruction: str = "") -> str:
    """The chat text before the image is placed (interleav_wrap_chat's ``prompt``)."""
    text = ""
    if meta_instruction:
        text += f"[UNUSED_TOKEN_146]system\n{meta_instruction}[UNUSED_TOKEN_145]\n"
    for turn in history:
        if len(turn) != 2:
            raise ModelError(f"A chat history turn must be (question, answer), got {turn!r}.")
        text += (f"[UNUSED_TOKEN_146]user\n{turn[0]}[UNUSED_TOKEN_145]\n"
                 f"[UNUSED_TOKEN_146]assistant\n{turn[1]}[UNUSED_TOKEN_145]\n")
    return text + f"[UNUSED_TOKEN_146]user\n{query}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"


def build_prompt_ids(tokenizer: InternLM2Tokenizer, query: str, history: Sequence[tuple[str, str]] = (),
                     meta_instruction: str = "") -> list[list[int]]:
    """Token ids per text part: the image goes between part 0 (BOS first) and part 1."""
    text = prompt_text(query, history, meta_instruction)
    if IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER + text
    parts = text.split(IMAGE_PLACEHOLDER)
    pieces = [tokenizer.encode(parts[0], add_bos=True)]
    pieces.extend(tokenizer.encode(part) for part in parts[1:] if part)
    return pieces


def prompt_length(pieces: Sequence[Sequence[int]], image_tokens: int) -> int:
    """Rows of the prompt: the text parts plus the image."""
    return sum(len(piece) for piece in pieces) + image_tokens


def assemble_prompt(embed, pieces: Sequence[Sequence[int]], image_embeds: torch.Tensor,
                    max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (1, L, hidden), im_mask (1, L) bool) of the prompt.

    ``embed`` maps a (1, n) LongTensor of ids to (1, n, hidden) (the decoder's ``embed``);
    ``image_embeds`` is (n_image_tokens, hidden) or (1, n_image_tokens, hidden).
    """
    image = image_embeds if image_embeds.dim() == 3 else image_embeds[None]
    total = prompt_length(pieces, image.shape[1])
    if total > max_length:
        raise ModelError(f"The prompt is {total} tokens, more than GeoPixel's {max_length}; GeoPixel would "
                         "silently drop the question. Use a smaller tile or a shorter chat history.")
    device = image.device
    rows, mask = [], []
    for index, piece in enumerate(pieces):
        ids = torch.tensor([list(piece)], dtype=torch.long, device=device)
        text = embed(ids)
        rows.append(text)
        mask.append(torch.zeros(len(piece), dtype=torch.bool, device=device))
        if index == 0:
            rows.append(image.to(text.dtype))
            mask.append(torch.ones(image.shape[1], dtype=torch.bool, device=device))
    return torch.cat(rows, dim=1), torch.cat(mask)[None]
