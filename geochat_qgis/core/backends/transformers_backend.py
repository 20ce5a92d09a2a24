"""transformers in process: GeoChat as a standard ``LlavaForConditionalGeneration`` checkpoint.

CUDA: bfloat16 (float16 where bf16 is unsupported) with SDPA attention and several tiles per
batched ``generate`` (left padding). CPU: float32. The prompt is exactly :func:`llava_v1_prompt`;
images go through the checkpoint's processor on its PIL path (models.md: the torchvision resize
differs by up to 21 grey levels). Tokens stream through a batch-aware streamer; a stopping
criterion ends generation between tokens when the cancel token is set.

The prompts of a tile share their prefix (system text and image): it is evaluated once (one
prefill, its key/value cache kept), and each prompt about the same tiles continues from it
(:class:`_PrefixCache`), so a 4-prompt run or a follow-up chat turn pays only its own text.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import BackendError, ModelError
from ..families.llava_v1 import llava_v1_prompt
from ..rgb_images import as_rgb
from ..vision.preprocess import geochat_image
from .base import Backend, Conversation, GenerateOptions, Generation, truncate_at_stop

log = logging.getLogger(__name__)


@dataclass
class TransformersSettings:
    """Device and precision; ``None`` means: choose for this machine."""

    device: Optional[str] = None  # "cuda", "cuda:1", "cpu"; None: CUDA when present
    dtype: Optional[str] = None  # "bfloat16", "float16", "float32"; None: bf16/fp16 on CUDA
    batch_size: Optional[int] = None  # tiles per generate; None: 8 on CUDA, 1 on CPU
    attn_implementation: str = "sdpa"


def _token_streamer(tokenizer, on_token, eos_id: Optional[int]):
    """A transformers streamer that decodes each row of a batch and reports new text per row."""
    from transformers.generation.streamers import BaseStreamer

    class BatchStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False
            self.tokens: list[list[int]] = []
            self.sent: list[str] = []
            self.done: list[bool] = []

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate() first hands over the prompt ids
                self.prompt_seen = True
                return
            row_tokens = value.reshape(-1).tolist()
            if not self.tokens:
                self.tokens = [[] for _ in row_tokens]
                self.sent = ["" for _ in row_tokens]
                self.done = [False for _ in row_tokens]
            for row, token in enumerate(row_tokens):
                if self.done[row]:
                    continue
                if token == eos_id:
                    self.done[row] = True
                    continue
                self.tokens[row].append(token)
                self.flush(row, final=False)

        def flush(self, row: int, final: bool) -> None:
            text = tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if not final and text.endswith("\ufffd"):
                return  # wait for the rest of a multi-byte character
            if len(text) > len(self.sent[row]):
                on_token(row, text[len(self.sent[row]):])
                self.sent[row] = text

        def end(self) -> None:
            for row in range(len(self.tokens)):
                self.flush(row, final=True)

    return BatchStreamer()


def _cancel_criteria(cancel):
    """A StoppingCriteria that ends every row once ``cancel`` is set."""
    import torch
    from transformers import StoppingCriteria

    class CancelCriteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.cancelled, dtype=torch.bool,
                              device=input_ids.device)

    return CancelCriteria()


def _image_token_id(model) -> int:
    config = model.config
    return getattr(config, "image_token_id", None) or config.image_token_index


class _PrefixCache:
    """The key/value cache of the last batch's prompt prefix (up to and including the image)."""

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.cache = None
        self.length = 0
        self.prefills = 0  # prefixes evaluated (cache misses), for tests and benchmarks

    @staticmethod
    def prefix_length(input_ids, image_token_id: int) -> int:
        """Positions up to and including the last image token (0: none, or rows differ)."""
        import torch

        if not bool(torch.all(input_ids == input_ids[:1])):
            return 0  # rows of one batch hold one prompt; anything else is not shared
        where = (input_ids[0] == image_token_id).nonzero()
        return int(where[-1]) + 1 if len(where) else 0

    def take(self, model, inputs, image_token_id: int):
        """(cache holding the prefix, its length) for ``inputs``, evaluating it on a miss;
        (None, 0) when the prompt has no shareable prefix."""
        import torch

        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        length = self.prefix_length(ids, image_token_id)
        if not length or length >= ids.shape[1] or not bool(mask.all()):
            return None, 0
        pixels = inputs["pixel_values"]
        digest = hashlib.blake2b(pixels.detach().float().cpu().numpy().tobytes(),
                                 digest_size=16).hexdigest()
        key = (digest, tuple(ids[0, :length].tolist()), ids.shape[0], str(pixels.dtype))
        if key != self.key:
            self.drop()
            with torch.inference_mode():
                out = model(input_ids=ids[:, :length], pixel_values=pixels,
                            attention_mask=mask[:, :length], use_cache=True, logits_to_keep=1)
            self.cache = getattr(out, "cache", None) or out.past_key_values
            self.key, self.length = key, length
            self.prefills += 1
        return self.cache, self.length

    def restore(self) -> None:
        """Cut the cache back to the prefix after a generation appended to it."""
        if self.cache is not None:
            excess = self.cache.get_seq_length() - self.length
            if excess > 0:
                self.cache.crop(-excess)  # negative: remove that many (every 4.x/5.x version)

    def drop(self) -> None:
        self.key, self.cache, self.length = None, None, 0


def _cache_keyword() -> str:
    """generate()'s name for a given cache: ``cache`` (transformers 5.x), else the old one."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES  # noqa: F401
    except ImportError:
        return "past_key_values"
    return "cache"


class TransformersBackend(Backend):
    """A LLaVA checkpoint folder (config.json, weights, processor) on CUDA or CPU."""

    name = "transformers"

    def __init__(self, model: str | os.PathLike[str], family: str = "geochat",
                 settings: Optional[TransformersSettings] = None) -> None:
        if family != "geochat":
            raise BackendError(
                f"The transformers backend runs converted GeoChat checkpoints, not '{family}'. "
                "Use the llama.cpp backend for Qwen2.5-VL GGUFs and the GeoPixel backend for "
                "GeoPixel."
            )
        self.path = Path(model)
        self.family = family
        self.settings = settings or TransformersSettings()
        self.model = None
        self.processor = None
        self.device = "cpu"
        self.prefix = _PrefixCache()

    @classmethod
    def from_loaded(cls, model, processor, path: str | os.PathLike[str] = "in-memory",
                    batch_size: int = 1) -> "TransformersBackend":
        """A backend around an already loaded model and processor (benchmarks, the runtime)."""
        backend = cls(path, settings=TransformersSettings(batch_size=batch_size))
        processor.tokenizer.padding_side = "left"
        backend.model, backend.processor = model.eval(), processor
        backend.device = str(model.device)
        backend.batch_size = batch_size
        return backend

    def describe(self) -> str:
        return f"{self.name}:{self.path.name}"

    def _check_folder(self) -> None:
        if not self.path.is_dir():
            kind = "a GGUF file: use --backend llama.cpp" if self.path.suffix == ".gguf" else \
                "not a folder"
            raise ModelError(
                f"{self.path} is {kind}. The transformers backend needs a Hugging Face checkpoint "
                "folder (config.json, weights, tokenizer and processor files)."
            )
        if not (self.path / "config.json").is_file():
            raise ModelError(
                f"{self.path} has no config.json: it is not a Hugging Face checkpoint. Convert "
                "GeoChat with `python -m geochat_qgis convert` or point at the converted folder."
            )

    def load(self) -> None:
        if self.model is not None:
            return
        self._check_folder()
        try:
            import torch
            from transformers import AutoProcessor, LlavaForConditionalGeneration
        except ImportError as exc:
            raise BackendError(
                "torch and transformers are needed for this backend. Install them with "
                "`python -m geochat_qgis deps install transformers`."
            ) from exc
        settings = self.settings
        cuda = torch.cuda.is_available()
        self.device = settings.device or ("cuda" if cuda else "cpu")
        if settings.dtype:
            dtype = getattr(torch, settings.dtype)
        elif self.device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
        self.batch_size = settings.batch_size or (8 if self.device.startswith("cuda") else 1)
        try:
            processor = AutoProcessor.from_pretrained(self.path, backend="pil")
            model = LlavaForConditionalGeneration.from_pretrained(
                self.path, dtype=dtype, attn_implementation=settings.attn_implementation
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(
                f"transformers could not load {self.path} ({exc}). GeoChat's original checkpoint "
                "(model_type 'geochat') must be converted first: `python -m geochat_qgis convert`."
            ) from exc
        processor.tokenizer.padding_side = "left"
        self.model = model.to(self.device).eval()
        self.processor = processor
        log.info("transformers loaded %s on %s as %s", self.path.name, self.device, dtype)

    def close(self) -> None:
        self.model = self.processor = None
        self.prefix.drop()

    def generate(self, images: Sequence[np.ndarray], conversation: Conversation,
                 options: GenerateOptions) -> list[Generation]:
        self.load()
        options.check_cancel()
        import torch
        from PIL import Image
        from transformers import StoppingCriteriaList

        processor, model = self.processor, self.model
        tokenizer = processor.tokenizer
        prompt = llava_v1_prompt(conversation.pairs())
        # GeoChat's pad-to-square (mean colour) and bicubic resize, done by the project: the
        # processor then finds a 504 px square and changes nothing.
        pil_images = [Image.fromarray(geochat_image(as_rgb(image)), "RGB") for image in images]
        inputs = processor(images=pil_images, text=[prompt] * len(pil_images),
                           return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        greedy = options.temperature <= 0
        extra = {} if greedy else {"temperature": options.temperature, "top_p": 1.0}
        if not greedy:
            torch.manual_seed(options.seed)
        eos_id = tokenizer.eos_token_id
        streamer = (_token_streamer(tokenizer, options.on_token, eos_id)
                    if options.on_token is not None else None)
        criteria = (StoppingCriteriaList([_cancel_criteria(options.cancel)])
                    if options.cancel is not None else None)
        start = time.perf_counter()
        try:
            prefills = self.prefix.prefills
            cache, shared = self.prefix.take(model, inputs, _image_token_id(model))
            if cache is None or self.prefix.prefills > prefills:
                shared = 0  # the whole prompt was evaluated for this generation
            if cache is not None:  # the prefix is in the cache: no pixels, only the rest is read
                inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
                extra[_cache_keyword()] = cache
            with torch.inference_mode():
                output = model.generate(
                    **inputs, max_new_tokens=options.max_new_tokens, do_sample=not greedy,
                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                    else eos_id,
                    streamer=streamer, stopping_criteria=criteria, **extra,
                )
            self.prefix.restore()
        except RuntimeError as exc:
            self.prefix.drop()
            raise BackendError(f"transformers generate failed: {exc}") from exc
        except BaseException:  # cancelled mid-way: the cache may hold a partial answer
            self.prefix.drop()
            raise
        options.check_cancel()
        seconds = (time.perf_counter() - start) / max(1, len(pil_images))
        prompt_length = inputs["input_ids"].shape[1]
        results = []
        for row in range(len(pil_images)):
            new_ids = output[row, prompt_length:].tolist()
            if eos_id in new_ids:
                new_ids = new_ids[: new_ids.index(eos_id)]
            text = tokenizer.decode(new_ids, skip_special_tokens=True)
            results.append(Generation(
                text=truncate_at_stop(text, options.stop).strip(),
                prompt_tokens=int(inputs["attention_mask"][row].sum()),
                generated_tokens=len(new_ids),
                seconds=seconds,
                extra={"finish_reason": "length" if len(new_ids) >= options.max_new_tokens
                       else "stop",
                       "evaluated_tokens": prompt_length - shared},
            ))
        return results
