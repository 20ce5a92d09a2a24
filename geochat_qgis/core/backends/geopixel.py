"""GeoPixel (InternLM-XComposer-2.5 + SAM-2) run by the project's own code (core/models/geopixel).

A thin adapter: it checks the settings, the tile sizes and the memory, loads
:class:`~geochat_qgis.core.models.geopixel.modeling.GeoPixelModel` from a checkpoint folder (the
published ``.bin`` shards or the converted safetensors) on the CPU, CUDA or Apple MPS, and turns
tiles and a conversation into its answers: the text with ``<p> phrase </p> [SEG]`` markup and the
(n_SEG, H, W) mask logits at each tile's own size, which the GeoPixel family parser pairs. A tile
that is not square goes in as it is: GeoPixel pads it itself. torch is imported when loading.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import BackendError, ModelError
from ..weights.machine import memory_available
from .base import Backend, Conversation, GenerateOptions, Generation

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bfloat16", "float32")
CUDA_BATCH = 4  # tiles per batch on a GPU when the memory allows it


@dataclass
class GeoPixelSettings:
    """Where and how GeoPixel runs."""

    device: str = "auto"  # auto (CUDA when present, else MPS, else the CPU), cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto = bfloat16 (GeoPixel's own type); float32: exact, twice the memory
    batch_size: Optional[int] = None  # tiles per call; None: up to 4 on CUDA, 1 elsewhere
    hd_num: int = 9  # IXC-2.5's crop budget as GeoPixel's evaluate uses it (3 x 3 for 1680 px)

    def __post_init__(self) -> None:
        device = str(self.device)
        if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise BackendError(f"GeoPixel device {self.device!r} is not one of {', '.join(DEVICES)} "
                               "(or cuda:N); choose one.")
        if self.dtype not in DTYPES:
            raise BackendError(f"GeoPixel dtype {self.dtype!r} is not one of {', '.join(DTYPES)}; choose one.")
        for name, value in (("batch_size", self.batch_size), ("hd_num", self.hd_num)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BackendError(f"GeoPixel {name} must be a whole number of at least 1, got {value!r}.")


class GeoPixelBackend(Backend):
    """GeoPixel-7B, GeoPixel-7B-RES or a tiny GeoPixel, from its checkpoint folder."""

    name = "geopixel"

    def __init__(self, model: str | os.PathLike[str], family: str = "geopixel",
                 settings: Optional[GeoPixelSettings] = None) -> None:
        self.weights = Path(model)
        self.family = family
        self.settings = settings or GeoPixelSettings()
        self.model: Any = None  # modeling.GeoPixelModel once loaded
        self.batch_size = self.settings.batch_size or 1

    def describe(self) -> str:
        return f"{self.name}:{self.weights.name}"

    def load(self) -> None:
        if self.model is not None:
            return
        try:
            import torch  # noqa: F401 - the model package needs it; say so before reading anything
        except ImportError:
            raise BackendError("The geopixel backend needs torch, which this Python lacks: install it "
                               "with 'python -m geochat_qgis deps install geopixel' (or the plugin's "
                               "Settings... > Install).") from None
        from ..models.geopixel import modeling

        checkpoint = modeling.read_checkpoint(self.weights)
        device = str(modeling.resolve_device(self.settings.device))
        dtype = "bfloat16" if self.settings.dtype == "auto" else self.settings.dtype
        batch = self.settings.batch_size or (CUDA_BATCH if device.startswith("cuda") else 1)
        batch = _check_memory(modeling, checkpoint, device, dtype, batch, self.settings.batch_size is None)
        start = time.perf_counter()
        self.model = modeling.GeoPixelModel.load(checkpoint, device=device, dtype=dtype)
        self.batch_size = batch
        log.info("GeoPixel loaded from %s on %s (%s) in %.1f s", self.weights, device, dtype,
                 time.perf_counter() - start)

    def close(self) -> None:
        self.model = None

    def generate(self, images: Sequence[np.ndarray], conversation: Conversation,
                 options: GenerateOptions) -> list[Generation]:
        from ..models.geopixel.hd_transform import check_tile_size

        if options.temperature:
            raise BackendError("GeoPixel answers greedily, as its evaluate does: set the temperature to 0.")
        if not conversation.turns:
            raise BackendError("The conversation has no question; ask one.")
        for image in images:
            shape = np.shape(image)
            check_tile_size(*(shape[:2] if len(shape) >= 2 else (0, 0)))
        self.load()
        options.check_cancel()
        history = [(turn.user, turn.assistant or "") for turn in conversation.turns[:-1]]
        query = conversation.turns[-1].user
        results: list[Generation] = []
        for first in range(0, len(images), self.batch_size):
            results += self._batch(list(images[first:first + self.batch_size]), first, query, history, options)
        return results

    def _batch(self, images: list[np.ndarray], first: int, query: str, history: list[tuple[str, str]],
               options: GenerateOptions) -> list[Generation]:
        streamed: list[list[int]] = [[] for _ in images]
        shown = [""] * len(images)

        def on_token(row: int, _step: int, token: int) -> None:
            if options.on_token is None:
                return
            streamed[row].append(token)
            text = self.model.reply(streamed[row])
            if text.startswith(shown[row]) and len(text) > len(shown[row]):
                options.on_token(first + row, text[len(shown[row]):])
                shown[row] = text

        start = time.perf_counter()
        try:
            answers = self.model.answer_many(
                images, [query] * len(images), [history] * len(images), options.max_new_tokens,
                cancel=options.cancel, on_token=on_token, hd_num=self.settings.hd_num)
        except RuntimeError as exc:  # torch: out of memory, a device failure
            raise BackendError(f"GeoPixel failed on {self.describe()}: {exc}. With little memory, use "
                               "batch_size 1 or dtype bfloat16.") from exc
        seconds = (time.perf_counter() - start) / len(images)
        return [Generation(text=a.text.strip(), masks=a.mask_logits, prompt_tokens=a.prompt_tokens,
                           generated_tokens=len(a.token_ids), seconds=seconds,
                           extra={"stop": a.stop, "masks": int(len(a.mask_logits))}) for a in answers]


def _check_memory(modeling, checkpoint, device: str, dtype: str, batch: int, flexible: bool) -> int:
    """The batch that fits (``flexible``: fewer tiles may be chosen); BackendError when not even the
    weights and one tile fit in the device's free memory."""
    weights = modeling.weights_bytes(checkpoint.shapes, dtype)
    free = _free_bytes(device)
    if free is None:
        return batch
    while flexible and batch > 1 and weights + modeling.activation_bytes(checkpoint.config, batch, dtype) > free:
        batch -= 1
    needed = weights + modeling.activation_bytes(checkpoint.config, batch, dtype)
    if needed > free:
        where = "GPU memory" if device.startswith("cuda") else "memory"
        hint = ("use dtype bfloat16" if dtype == "float32" else
                "use the CPU (device cpu) with enough RAM" if device.startswith("cuda") else
                "close other programs or use a machine with more RAM")
        raise BackendError(
            f"GeoPixel needs about {needed / 2**30:.1f} GiB of {where} ({weights / 2**30:.1f} GiB of weights "
            f"in {dtype} + {(needed - weights) / 2**30:.1f} GiB for {batch} tile(s) at a time); only "
            f"{free / 2**30:.1f} GiB are free. {hint[0].upper() + hint[1:]}"
            f"{'' if batch == 1 else ', or batch_size 1'}.")
    return batch


def _free_bytes(device: str) -> Optional[int]:
    """Free memory on ``device`` now (None when it cannot be told)."""
    if device.startswith("cuda"):
        import torch

        try:
            free, _total = torch.cuda.mem_get_info(torch.device(device))
        except (RuntimeError, AssertionError) as exc:
            raise ModelError(f"Cannot use {device}: {exc}") from exc
        return int(free)
    if device == "mps":
        return None
    return memory_available()
