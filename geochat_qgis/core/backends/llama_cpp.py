"""llama.cpp in process (llama-cpp-python 0.3.x): GeoChat and Qwen2.5-VL GGUFs.

GeoChat: the project computes the image embeddings itself, exactly (core/vision: GeoChat's
padding and resize, the CLIP tower at 504 px with CLS first, layer -2, the exact-GELU projector,
read from the mmproj GGUF), and hands them to llama.cpp at the image's place in the llava_v1
prompt (a ``llama_batch`` carrying embeddings). libmtmd encodes GeoChat's images only where the
start-up self-test (core/vision/selftest.py) proves the installed build right; every release
since 0.3.10 fails it (CLS appended after the patches, float16 GELU tables). Each tile is
encoded once per run (cached), and a prompt continues from the longest prefix the context
already holds: the prompts of a tile share its system text and image, a chat's follow-up turn
pays only for itself.

Qwen2.5-VL goes through libmtmd and its chat handler (no CLS token, M-RoPE image positions) after
the self-test of its ``qwen2.5vl_merger`` projector; where that fails (stock 0.3.36: float16 in
llama.cpp's patch embedding and GELU, about 2e-3 off) it still runs there, and
:attr:`LlamaCppBackend.vision_note`, the log and each Generation's ``extra`` say so. With
``vision="project"`` the project computes Qwen's exact image features (numpy, CPU) and llama.cpp
decodes them at libmtmd's own M-RoPE image positions (core/vision/qwen_encoder.py). Decoding streams token by
token so the cancel token is honoured between tokens; a GBNF grammar can constrain the answer.
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


VISION_CHOICES = ("auto", "project", "libmtmd")


@dataclass
class LlamaCppSettings:
    """llama.cpp load settings. ``None`` means: choose for this machine."""

    n_ctx: int = 2048  # GeoChat: 1296 image tokens + prompt + answer
    n_threads: Optional[int] = None  # None: llama-cpp-python's default (half the cores)
    n_gpu_layers: Optional[int] = None  # None: all layers when the build and a GPU allow it
    n_batch: int = 512
    verbose: bool = False
    kv_f32: bool = False  # float32 KV cache: exact work, twice the KV memory (default float16)
    #: who encodes GeoChat's images: "auto" (libmtmd only when its self-test passes),
    #: "project" (always the project's encoder), "libmtmd" (always libmtmd: comparisons only).
    #: Qwen2.5-VL: "auto" and "libmtmd" encode on libmtmd ("auto" runs its self-test and
    #: reports a failure); "project" computes Qwen's exact features in numpy (slower) and
    #: llama.cpp decodes them (tiles that need a resize stay on libmtmd)
    vision: str = "auto"
    vision_device: Optional[str] = None  # the project's encoder: "cpu", "cuda"; None: CUDA if any


MAX_CTX = 1 << 20


def _check_settings(settings: LlamaCppSettings) -> None:
    """BackendError for a setting of the wrong type or range (a hand-written request)."""
    def whole(name: str, low: int, high: int, optional: bool = False) -> None:
        value = getattr(settings, name)
        if optional and value is None:
            return
        if isinstance(value, float) and value.is_integer():  # a form's number field: 4096.0
            value = int(value)
            setattr(settings, name, value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise BackendError(f"{name} must be a whole number from {low} to {high}, not "
                               f"{value!r}.")

    whole("n_ctx", 1, MAX_CTX)
    whole("n_batch", 1, MAX_CTX)
    whole("n_threads", -(1 << 31), (1 << 31) - 1, optional=True)  # llama.cpp's int32
    whole("n_gpu_layers", -(1 << 31), (1 << 31) - 1, optional=True)  # negative: all layers
    if not isinstance(settings.kv_f32, bool):
        raise BackendError(f"kv_f32 must be true or false, not {settings.kv_f32!r}.")


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
        if self.settings.vision not in VISION_CHOICES:
            raise BackendError(f"vision must be one of {', '.join(VISION_CHOICES)}, "
                               f"not {self.settings.vision!r}.")
        _check_settings(self.settings)
        self.text_info: Optional[GGUFInfo] = None
        self.projector_info: Optional[GGUFInfo] = None
        self._llama = None
        self._handler = None
        self.encoder = None  # the project's ImageEncoder (GeoChat unless libmtmd passed)
        self.evaluator = None  # PromptEvaluator (with the encoder)
        self.verdict = None  # the libmtmd self-test's Verdict, when it ran
        self.vision_note = ""  # Qwen2.5-VL: how libmtmd's image features differ, if they do
        self.qwen_encoder = None  # Qwen2.5-VL with vision "project": QwenImageEncoder
        self._chunks = None  # Qwen2.5-VL: OwnImageChunks inside the chat handler
        self.vision = ""  # who encodes images, in words

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
        if self.family in LLAVA_V1_FAMILIES and projector.image_size not in (None, 504):
            raise ModelError(
                f"{projector.path.name} takes {projector.image_size} px images, GeoChat sees 504 "
                "px (CLIP-336's position table interpolated to 504): convert the model with the "
                "project's converter (python -m geochat_qgis models get geochat-7b --to "
                "gguf).")
        _route_mtmd_logs()
        settings = self.settings
        if self.family in LLAVA_V1_FAMILIES and settings.n_ctx < 2048:
            raise BackendError(f"n_ctx {settings.n_ctx} is too small for GeoChat: use >= 2048.")
        gpu_layers = default_gpu_layers() if settings.n_gpu_layers is None else settings.n_gpu_layers
        kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} \
            if settings.kv_f32 else {}
        try:
            llama = llama_cpp.Llama(
                model_path=str(text.path),
                n_ctx=settings.n_ctx,
                n_threads=settings.n_threads,
                n_gpu_layers=gpu_layers,
                n_batch=settings.n_batch,
                verbose=settings.verbose,
                **kv,
            )
        except MemoryError as exc:
            raise BackendError(f"Not enough memory for a context of {settings.n_ctx} tokens: "
                               "lower n_ctx.") from exc
        except (ValueError, RuntimeError) as exc:
            if "llama_context" in str(exc):  # the model loaded; its KV cache did not fit
                raise BackendError(
                    f"llama.cpp could not create a context of {settings.n_ctx} tokens for "
                    f"{text.path.name} ({exc}): not enough memory; lower n_ctx (2048 fits "
                    "GeoChat) or use kv_f32 off.") from exc
            raise ModelError(
                f"llama.cpp could not load {text.path.name} ({exc}). Check that it is a complete "
                "GGUF of a supported architecture, or convert it again."
            ) from exc
        try:
            if self._use_libmtmd(llama, projector.path, gpu_layers != 0):
                self._handler = self._init_handler(llama, projector.path)
                self.vision = "libmtmd"
                if self.family not in LLAVA_V1_FAMILIES:  # counts M-RoPE image tokens
                    from ..vision.qwen_encoder import OwnImageChunks

                    self._chunks = OwnImageChunks(self._handler._mtmd_cpp)
                    self._handler._mtmd_cpp = self._chunks
                    if settings.vision == "project":
                        self._own_qwen_images(projector.path)
            else:
                from ..vision.encoder import ImageEncoder
                from .llama_prompt import PromptEvaluator

                self.encoder = ImageEncoder(projector.path, settings.vision_device)
                self.evaluator = PromptEvaluator(llama)
                self.vision = f"the project's encoder ({self.encoder.device})"
        except BackendError:  # a setting (vision_device), not the file: as it is
            llama.close()
            raise
        except (ValueError, RuntimeError, ModelError) as exc:
            llama.close()
            raise ModelError(
                f"llama.cpp could not load the vision projector {projector.path.name} with "
                f"{text.path.name} ({exc}). Use the mmproj made for this model."
            ) from exc
        log.info("llama.cpp loaded %s + %s (gpu layers %s, images: %s%s)", text.path.name,
                 projector.path.name, gpu_layers, self.vision,
                 f"; {self.vision_note}" if self.vision_note else "")
        self.text_info, self.projector_info = text, projector
        self._llama = llama

    def _use_libmtmd(self, llama, mmproj: Path, use_gpu: bool) -> bool:
        """libmtmd where its self-test passes; Qwen2.5-VL always (no own path), tested."""
        choice = self.settings.vision
        if self.family not in LLAVA_V1_FAMILIES:
            self._test_qwen(llama, mmproj, choice)
            return True
        if choice == "libmtmd":
            return True
        if choice == "project":
            return False
        from ..vision.mmproj import OWN_PROJECTORS, projector_type
        from ..vision.selftest import libmtmd_verdict

        kind = projector_type(mmproj)
        if kind not in OWN_PROJECTORS:
            return True
        self.verdict = libmtmd_verdict(llama.model, llama.n_embd(), kind, use_gpu)
        if not self.verdict.ok:
            log.info("%s", self.verdict.message)
        return self.verdict.ok

    def _test_qwen(self, llama, mmproj: Path, choice: str) -> None:
        """Qwen2.5-VL's images go through libmtmd whatever its self-test finds (M-RoPE image
        positions: the project has no own path into llama.cpp); a failed test is reported in
        :attr:`vision_note`, the log and every Generation's ``extra``."""
        if choice != "auto":  # "libmtmd": as asked; "project": exact features, no test needed
            return
        from ..vision.mmproj import projector_type
        from ..vision.selftest import TESTED_PROJECTORS, libmtmd_verdict

        kind = projector_type(mmproj)
        if kind not in TESTED_PROJECTORS:
            self.vision_note = (f"libmtmd's {kind} image features are not checked (no exact "
                                "reference for this projector type)")
            return
        # llama-cpp-python's chat handler asks libmtmd for the GPU whenever the build has one
        self.verdict = libmtmd_verdict(llama.model, llama.n_embd(), kind, use_gpu=True)
        if not self.verdict.ok:
            self.vision_note = self.verdict.message
            log.warning("%s", self.verdict.message)

    def _own_qwen_images(self, mmproj: Path) -> None:
        """Qwen's exact image features, decoded by llama.cpp's helper (its M-RoPE positions)."""
        from ..vision.qwen_encoder import QwenImageEncoder

        self.qwen_encoder = QwenImageEncoder(mmproj)  # its features go through OwnImageChunks
        self.vision = "the project's Qwen2.5-VL encoder (numpy), decoded by llama.cpp"

    def _init_handler(self, llama, mmproj: Path):
        handler = _handler_classes()[self.family](
            clip_model_path=str(mmproj), verbose=self.settings.verbose)
        handler.images = {}
        handler._init_mtmd_context(llama)
        return handler

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()
        if self._llama is not None:
            self._llama.close()
        self._llama = self._handler = self.encoder = self.evaluator = self.qwen_encoder = None
        self._chunks = None

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
        run = self._generate_own if self.encoder is not None else self._generate_one
        return [run(index, image, conversation, options) for index, image in enumerate(images)]

    def segments(self, image: np.ndarray, conversation: Conversation) -> list:
        """The prompt as [text ids, image embeddings, text ids] (the project's encoder)."""
        from ..vision.encoder import tile_key
        from .llama_prompt import ImageSegment

        llama = self._llama
        if not conversation.turns:
            raise BackendError("The conversation has no question: ask one.")
        prompt = llava_v1_prompt(conversation.pairs())
        before, after = prompt.split(IMAGE_TOKEN, 1)
        key = tile_key(image)
        rows = self.encoder.embed(image, key)
        return [llama.tokenize(before.encode(), add_bos=True, special=True),
                ImageSegment(key, rows),
                llama.tokenize(after.encode(), add_bos=False, special=True)]

    def next_token_logits(self, image: np.ndarray, conversation: Conversation) -> np.ndarray:
        """The logits after the prompt for ``image`` (project's encoder; tests, diagnostics)."""
        self.load()
        if self.evaluator is None:
            raise BackendError("next_token_logits needs the project's image encoder")
        self.evaluator.evaluate(self.segments(as_rgb(image), conversation))
        return self.evaluator.last_logits()

    def _generate_own(self, index: int, image: np.ndarray, conversation: Conversation,
                      options: GenerateOptions) -> Generation:
        options.check_cancel()
        start = time.perf_counter()
        encoded = self.encoder.encoded
        segments = self.segments(as_rgb(image), conversation)
        encoded_at = time.perf_counter()
        prompt = self.evaluator.evaluate(segments, options.check_cancel)
        evaluated = self.evaluator.evaluated
        evaluated_at = time.perf_counter()
        text, generated, finish = _decode(self._llama, prompt, index, options)
        end = time.perf_counter()
        return Generation(
            text=text.strip(), prompt_tokens=len(prompt), generated_tokens=generated,
            seconds=end - start,
            extra={"finish_reason": finish, "evaluated_tokens": evaluated,
                   "image_encoded": self.encoder.encoded > encoded,
                   # where the time went (the image encoder, the prompt, the answer)
                   "seconds_encode": round(encoded_at - start, 4),
                   "seconds_prompt": round(evaluated_at - encoded_at, 4),
                   "seconds_answer": round(end - evaluated_at, 4), **self._vision_extra()},
        )

    def _generate_one(self, index: int, image: np.ndarray, conversation: Conversation,
                      options: GenerateOptions) -> Generation:
        options.check_cancel()
        llama, handler = self._llama, self._handler
        key = _IMAGE_KEY.format(index=index)
        if self.family in LLAVA_V1_FAMILIES:
            from ..vision.preprocess import geochat_image

            image = geochat_image(image)  # GeoChat's pad-then-resize, not libmtmd's
        handler.images = {key: as_rgb(image)}
        vision = self._vision_extra()
        features = None
        if self.qwen_encoder is not None:
            if self.qwen_encoder.takes(handler.images[key]):
                features = self.qwen_encoder.embed(handler.images[key])
            else:
                vision["vision"] = "libmtmd (the tile needs a resize: sides multiples of 28)"
        chunks = self._chunks
        if chunks is not None:
            chunks.start(features)
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
            if chunks is not None:
                chunks.features = None
        prompt = llama.input_ids[: llama.n_tokens].tolist()
        # M-RoPE images take fewer positions than tokens: count the tokens
        prompt_tokens = len(prompt) + (chunks.unpositioned if chunks is not None else 0)
        text, generated, finish = _decode(llama, prompt, index, options)
        return Generation(
            text=text.strip(),
            prompt_tokens=prompt_tokens,
            generated_tokens=generated,
            seconds=time.perf_counter() - start,
            extra={"finish_reason": finish, "evaluated_tokens": len(prompt), **vision},
        )

    def _vision_extra(self) -> dict[str, Any]:
        """Who encoded the image, and the self-test's finding when libmtmd failed it."""
        extra: dict[str, Any] = {"vision": self.vision}
        if self.vision_note:
            extra["vision_warning"] = self.vision_note
        if self.verdict is not None and np.isfinite(self.verdict.max_error):
            extra["vision_max_error"] = self.verdict.max_error
        return extra


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
    except RuntimeError as exc:  # llama_decode failed; n_tokens/input_ids stay consistent
        raise BackendError(f"llama.cpp failed while writing the answer ({exc}): try again; if "
                           "it persists, raise the context size (n_ctx)") from exc
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
