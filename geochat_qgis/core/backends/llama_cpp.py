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

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import BackendError, ModelError
from ..families.llava_v1 import IMAGE_TOKEN, llava_v1_prompt
from ..llama_library import default_gpu_layers, route_mtmd_logs
from ..rgb_images import as_rgb
from ..vision.encoder import ImageEncoder, tile_key
from ..vision.mmproj import OWN_PROJECTORS, projector_type
from ..vision.preprocess import geochat_image
from ..vision.qwen_encoder import OwnImageChunks, QwenImageEncoder
from ..vision.selftest import TESTED_PROJECTORS, libmtmd_verdict
from .base import Backend, Conversation, GenerateOptions, Generation
from .gguf_files import GGUFInfo, resolve_gguf_pair
from .llama_decode import decode
from .llama_handlers import handler_classes
from .llama_prompt import ImageSegment, PromptEvaluator
from .llama_settings import VISION_CHOICES, LlamaCppSettings, check_settings
from .messages import LLAVA_V1_FAMILIES, chat_messages

log = logging.getLogger(__name__)

_IMAGE_KEY = "geochat-tile://{index}"


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
        check_settings(self.settings)
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
        route_mtmd_logs()
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
                    self._chunks = OwnImageChunks(self._handler._mtmd_cpp)
                    self._handler._mtmd_cpp = self._chunks
                    if settings.vision == "project":
                        self._own_qwen_images(projector.path)
            else:
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
        self.qwen_encoder = QwenImageEncoder(mmproj)  # its features go through OwnImageChunks
        self.vision = "the project's Qwen2.5-VL encoder (numpy), decoded by llama.cpp"

    def _init_handler(self, llama, mmproj: Path):
        handler = handler_classes()[self.family](
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
        text, generated, finish = decode(self._llama, prompt, index, options)
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
        text, generated, finish = decode(llama, prompt, index, options)
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


