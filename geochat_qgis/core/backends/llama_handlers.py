"""llama-cpp-python's chat handlers, taught to take tiles as numpy arrays: GeoChat's (the
caller renders the llava_v1 prompt) and Qwen2.5-VL's. Built on first use: they subclass
llama_cpp's classes, which load lazily."""
from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=None)
def handler_classes() -> dict[str, type]:
    """Chat handler classes (built on first use: they subclass llama_cpp's)."""
    from llama_cpp.llama_chat_format import Llava15ChatHandler, Qwen25VLChatHandler

    class RawImageMixin:
        """Takes tiles as numpy arrays keyed by placeholder URLs instead of encoded images."""

        images: dict[str, np.ndarray] = {}

        def load_image(self, image_url: str):  # returns an array for our own keys
            if image_url in self.images:
                return self.images[image_url]
            return super().load_image(image_url)

        def _create_bitmap_from_bytes(self, image):
            if not isinstance(image, np.ndarray):
                return super()._create_bitmap_from_bytes(image)
            height, width = image.shape[:2]
            buffer = (ctypes.c_uint8 * image.size).from_buffer(np.array(image, copy=True))
            bitmap = self._mtmd_cpp.mtmd_bitmap_init(width, height, buffer)
            if bitmap is None:
                raise ValueError("libmtmd could not take the tile image")
            return bitmap

    class GeoChatHandler(RawImageMixin, Llava15ChatHandler):
        """Renders the text parts as given: the caller passes the full llava_v1 prompt."""

        DEFAULT_SYSTEM_MESSAGE = None
        CHAT_FORMAT = (
            "{% for message in messages %}{% for part in message.content %}"
            "{% if part.type == 'text' %}{{ part.text }}{% endif %}"
            "{% endfor %}{% endfor %}"
        )

    class QwenHandler(RawImageMixin, Qwen25VLChatHandler):
        pass

    return {"geochat": GeoChatHandler, "qwen2.5-vl": QwenHandler}
