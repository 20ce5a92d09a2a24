"""GeoChat's ``llava_v1`` conversation template (geochat/conversation.py), exactly."""
from __future__ import annotations

from typing import Optional, Sequence

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_TOKEN = "<image>"
EOS = "</s>"


def llava_v1_prompt(turns: Sequence[tuple[str, Optional[str]]], with_image: bool = True) -> str:
    """The full prompt for ``turns`` = [(user, assistant or None), ...].

    The image goes with the first user turn (``<image>\\n`` before its text). Separators as
    GeoChat's ``SeparatorStyle.TWO`` (sep " ", sep2 ``</s>``): ``SYSTEM USER: q1 ASSISTANT: a1</s>USER:
    q2 ASSISTANT:``; no space after ``</s>``, none after the final ``ASSISTANT:``.
    """
    parts = [SYSTEM, " "]
    for index, (user, assistant) in enumerate(turns):
        if index == 0 and with_image:
            user = f"{IMAGE_TOKEN}\n{user}"
        parts.append(f"USER: {user} ASSISTANT:")
        if assistant is not None:
            parts.append(f" {assistant}{EOS}")
    return "".join(parts)
