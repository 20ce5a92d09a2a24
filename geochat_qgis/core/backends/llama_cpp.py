"""llama.cpp in process (llama-cpp-python 0.3.x, libmtmd): GeoChat and Qwen2.5-VL GGUFs.

GeoChat's prompt is exactly :func:`llava_v1_prompt` (not llama-cpp-python's LLaVA template): a
chat handler renders the prompt text as given and puts the image where ``<image>`` stands. Tiles
go to libmtmd as raw RGB bitmaps (no PNG round trip). Decoding streams token by token so the
cancel token is honoured between tokens; a GBNF grammar can constrain the answer.
"""
from __future__ import annotations

import codecs
import ctypes
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import BackendError, ModelError
from ..families.llava_v1 import IMAGE_TOKEN, llava_v1_prompt
from .base import Backend, Conversation, GenerateOptions, Generation
from .gguf_files import GGUFInfo, resolve_gguf_pair
from .images import as_rgb
from .messages import LLAVA_V1_FAMILIES, chat_messages

log = logging.getLogger(__name__)

_IMAGE_KEY = "geochat-tile://{index}"


@dataclass
class LlamaCppSettings:
    """llama.cpp load settings. ``None`` means: choose for this machine."""

    n_ctx: int = 2048  # GeoChat: 1296 image tokens + prompt + answer
    n_threads: Optional[int] = None  # None: llama-cpp-python's default (half the cores)
    n_gpu_layers: Optional[int] = None  # None: all layers when the build and a GPU allow it
    n_batch: int = 512
    verbose: bool = False


def gpu_present() -> bool:
    """Whether this machine has a GPU that a GPU-enabled llama.cpp build can use."""
    return (
        sys.platform == "darwin"
        or Path("/dev/nvidia0").exists()
        or Path("/dev/kfd").exists()
        or shutil.which("nvidia-smi") is not None
    )


def default_gpu_layers() -> int:
    """-1 (all layers) when llama.cpp was built with GPU offload and a GPU is present, else 0."""
    import llama_cpp

    return -1 if llama_cpp.llama_supports_gpu_offload() and gpu_present() else 0


@lru_cache(maxsize=None)
def _route_mtmd_logs() -> None:
    """Send libmtmd's logs through llama-cpp-python's logger (quiet unless verbose)."""
    from llama_cpp import _logger, mtmd_cpp

    mtmd_cpp.mtmd_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


@lru_cache(maxsize=None)
def _handler_classes() -> dict[str, type]:
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


class LlamaCppBackend(Backend):
    """A GGUF text model plus its mmproj, loaded once, answering one tile at a time."""

    name = "llama.cpp"

    def __init__(self, model: str | os.PathLike[str], mmproj: Optional[str | os.PathLike[str]] = None,
                 family: str = "geochat", settings: Optional[LlamaCppSettings] = None) -> None:
        if family not in ("geochat", "qwen2.5-vl"):
            raise BackendError(
                f"The llama.cpp backend runs GeoChat and Qwen2.5-VL GGUFs, not '{family}'. "
                "GeoPixel needs the GeoPixel backend (NVIDIA GPU)."
            )
        self.model_arg = model
        self.mmproj_arg = mmproj
        self.family = family
        self.settings = settings or LlamaCppSettings()
        self.text_info: Optional[GGUFInfo] = None
        self.projector_info: Optional[GGUFInfo] = None
        self._llama = None
        self._handler = None

    def describe(self) -> str:
        model = self.text_info.path.name if self.text_info else Path(self.model_arg).name
        return f"{self.name}:{model}"

    def load(self) -> None:
        if self._llama is not None:
            return
        try:
            import llama_cpp
        except ImportError as exc:
            raise BackendError(
                "llama-cpp-python is not installed. Install it with "
                "`python -m geochat_qgis deps install llama.cpp` (or pip install llama-cpp-python)."
            ) from exc
        text, projector = resolve_gguf_pair(self.model_arg, self.mmproj_arg)
        _route_mtmd_logs()
        settings = self.settings
        if self.family in LLAVA_V1_FAMILIES and settings.n_ctx < 2048:
            raise BackendError(f"n_ctx {settings.n_ctx} is too small for GeoChat: use >= 2048.")
        gpu_layers = default_gpu_layers() if settings.n_gpu_layers is None else settings.n_gpu_layers
        handler = _handler_classes()[self.family](
            clip_model_path=str(projector.path), verbose=settings.verbose
        )
        handler.images = {}
        try:
            llama = llama_cpp.Llama(
                model_path=str(text.path),
                chat_handler=handler,
                n_ctx=settings.n_ctx,
                n_threads=settings.n_threads,
                n_gpu_layers=gpu_layers,
                n_batch=settings.n_batch,
                verbose=settings.verbose,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(
                f"llama.cpp could not load {text.path.name} ({exc}). Check that it is a complete "
                "GGUF of a supported architecture, or convert it again."
            ) from exc
        try:
            handler._init_mtmd_context(llama)
        except (ValueError, RuntimeError) as exc:
            llama.close()
            raise ModelError(
                f"llama.cpp could not load the vision projector {projector.path.name} with "
                f"{text.path.name} ({exc}). Use the mmproj made for this model."
            ) from exc
        log.info("llama.cpp loaded %s + %s (gpu layers %s)", text.path.name,
                 projector.path.name, gpu_layers)
        self.text_info, self.projector_info = text, projector
        self._llama, self._handler = llama, handler

    def close(self) -> None:
        if self._llama is not None:
            self._llama.close()
        self._llama = self._handler = None

    def _messages(self, conversation: Conversation, key: str) -> list[dict[str, Any]]:
        if self.family in LLAVA_V1_FAMILIES:
            prompt = llava_v1_prompt(conversation.pairs()).replace(IMAGE_TOKEN, key, 1)
            return [{"role": "user", "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": {"url": key}},
            ]}]
        return chat_messages(conversation, key)

    def generate(self, images: Sequence[np.ndarray], conversation: Conversation,
                 options: GenerateOptions) -> list[Generation]:
        self.load()
        return [self._generate_one(index, image, conversation, options)
                for index, image in enumerate(images)]

    def _generate_one(self, index: int, image: np.ndarray, conversation: Conversation,
                      options: GenerateOptions) -> Generation:
        options.check_cancel()
        llama, handler = self._llama, self._handler
        key = _IMAGE_KEY.format(index=index)
        handler.images = {key: as_rgb(image)}
        start = time.perf_counter()
        try:
            # The handler evaluates the prompt (text and image chunks) and returns a lazy
            # completion stream; decoding runs in our own loop below (token by token, O(1) work
            # per token: llama-cpp-python's stream re-detokenizes the whole answer each token).
            handler(llama=llama, messages=self._messages(conversation, key),
                    max_tokens=1, stream=True).close()
        except ValueError as exc:
            raise BackendError(f"llama.cpp could not read the prompt or tile: {exc}") from exc
        finally:
            handler.images = {}
        prompt = llama.input_ids[: llama.n_tokens].tolist()
        text, generated, finish = _decode(llama, prompt, index, options)
        return Generation(
            text=text.strip(),
            prompt_tokens=len(prompt),
            generated_tokens=generated,
            seconds=time.perf_counter() - start,
            extra={"finish_reason": finish},
        )


def _decode(llama, prompt: list[int], index: int, options: GenerateOptions
            ) -> tuple[str, int, str]:
    """Sample after the evaluated ``prompt`` until end of generation, a stop string, the token
    limit or a cancel; returns (text, tokens generated, finish reason)."""
    import llama_cpp

    if options.temperature > 0:
        llama.set_seed(options.seed)
    vocab = llama._model.vocab
    limit = min(options.max_new_tokens, llama.n_ctx() - len(prompt))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    text = ""
    count = 0
    finish = "length"
    tokens = llama.generate(prompt, temp=options.temperature, repeat_penalty=1.0,
                            grammar=_grammar(options.grammar), reset=True)
    try:
        for token in tokens:
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            count += 1
            piece = decoder.decode(llama.detokenize([token]))
            if piece:
                text += piece
                if options.on_token is not None:
                    options.on_token(index, piece)
            cut = _stop_index(text, options.stop, len(piece))
            if cut >= 0:
                text, finish = text[:cut], "stop"
                break
            if options.cancel is not None and options.cancel.cancelled:
                options.check_cancel()
            if count >= limit:
                break
    finally:
        tokens.close()
    return text + decoder.decode(b"", final=True), count, finish


def _stop_index(text: str, stop: Sequence[str], new: int) -> int:
    """Where the first stop string in the tail of ``text`` starts (only the tail can be new)."""
    for word in stop:
        if word:
            at = text.find(word, max(0, len(text) - new - len(word)))
            if at >= 0:
                return at
    return -1


@lru_cache(maxsize=8)
def _grammar(text: Optional[str]):
    """A compiled LlamaGrammar for GBNF ``text`` (cached: jobs reuse one grammar per task)."""
    if not text:
        return None
    from llama_cpp import LlamaGrammar

    try:
        return LlamaGrammar.from_string(text, verbose=False)
    except ValueError as exc:
        raise BackendError(f"The GBNF grammar does not parse: {exc}") from exc
