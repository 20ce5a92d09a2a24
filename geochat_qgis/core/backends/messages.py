"""Conversations as OpenAI-style chat messages (HTTP servers, llama.cpp's Qwen2.5-VL handler).

GeoChat's messages carry its ``llava_v1`` system prompt and put the image first in the first user
turn, so a server whose chat template is GeoChat's (the converted checkpoint's, or the GGUF's
``tokenizer.chat_template``) renders exactly :func:`llava_v1_prompt`.
"""
from __future__ import annotations

from typing import Any

from ..families.llava_v1 import SYSTEM
from .base import Conversation

#: families whose prompt starts with the llava_v1 system message
LLAVA_V1_FAMILIES = frozenset({"geochat"})


def chat_messages(conversation: Conversation, image_url: str) -> list[dict[str, Any]]:
    """``[{"role": ..., "content": ...}, ...]`` with the image in the first user turn."""
    messages: list[dict[str, Any]] = []
    if conversation.family in LLAVA_V1_FAMILIES:
        messages.append({"role": "system", "content": SYSTEM})
    for index, (user, assistant) in enumerate(conversation.pairs()):
        if index == 0:
            content: Any = [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": user},
            ]
        else:
            content = user
        messages.append({"role": "user", "content": content})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    return messages
