"""GeoPixel (InternLM-XComposer-2.5 + SAM-2 mask decoder) from a user's source checkout and weights.

GeoPixel's code hard-codes ``.cuda()`` and flash attention (models.md), so this backend runs on
NVIDIA GPUs only and refuses clearly elsewhere. It returns the text with ``<p> phrase </p> [SEG]``
markup and the mask stack (n_SEG, H, W) of logits at the tile's resolution; the GeoPixel family
parser pairs them. Masks are only produced when the image is given as a file, so each tile is
written to a temporary PNG.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import BackendError, ModelError
from .base import Backend, Conversation, GenerateOptions, Generation
from .images import png_bytes

log = logging.getLogger(__name__)

NEEDS_GPU = (
    "GeoPixel needs an NVIDIA GPU with CUDA (its code calls .cuda() and uses flash attention); "
    "this machine has none. Use the GeoChat GGUF model with the llama.cpp backend instead "
    "(--backend llama.cpp): it runs on the CPU and answers with oriented boxes instead of masks."
)


@dataclass
class GeoPixelSettings:
    """Where GeoPixel's code lives and how it partitions tiles."""

    source: Optional[str] = None  # a checkout of mbzuai-oryx/GeoPixel (holds model/geopixel.py)
    hd_num: int = 9  # 560 px sub-images; a square under 1680 px is upscaled to 3 x 3
    query_prefix: str = ""  # prepended to the question (UNVERIFIED: e.g. "<ImageHere>")


def cuda_available() -> bool:
    """Whether torch is installed with CUDA and sees a GPU."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class GeoPixelBackend(Backend):
    """GeoPixel-7B or GeoPixel-7B-RES weights run with GeoPixel's own ``evaluate``."""

    name = "geopixel"

    def __init__(self, model: str | os.PathLike[str], family: str = "geopixel",
                 settings: Optional[GeoPixelSettings] = None) -> None:
        self.weights = Path(model)
        self.family = family
        self.settings = settings or GeoPixelSettings()
        self.model = None
        self.tokenizer = None

    def describe(self) -> str:
        return f"{self.name}:{self.weights.name}"

    def load(self) -> None:
        if self.model is not None:
            return
        if not cuda_available():
            raise BackendError(NEEDS_GPU)
        source = Path(self.settings.source or "")
        if not (source / "model" / "geopixel.py").is_file():
            raise ModelError(
                f"'{source}' is not a GeoPixel source checkout (no model/geopixel.py). Clone "
                "https://github.com/mbzuai-oryx/GeoPixel and give its folder as the source."
            )
        if not (self.weights / "config.json").is_file():
            raise ModelError(
                f"{self.weights} holds no GeoPixel weights (no config.json). Download "
                "MBZUAI/GeoPixel-7B or MBZUAI/GeoPixel-7B-RES and give that folder."
            )
        import torch
        from transformers import AutoTokenizer

        if str(source) not in sys.path:
            sys.path.insert(0, str(source))
        from model.geopixel import GeoPixelForCausalLM  # GeoPixel's own package layout

        tokenizer = AutoTokenizer.from_pretrained(
            self.weights, padding_side="right", use_fast=False, trust_remote_code=True
        )
        tokenizer.pad_token = tokenizer.unk_token
        seg_token_idx = tokenizer("[SEG]", add_special_tokens=False).input_ids[-1]
        model = GeoPixelForCausalLM.from_pretrained(
            self.weights, low_cpu_mem_usage=True, seg_token_idx=seg_token_idx,
            torch_dtype=torch.bfloat16,
        )
        model.tokenizer = tokenizer
        self.model = model.cuda().eval()
        self.tokenizer = tokenizer
        log.info("GeoPixel loaded from %s", self.weights)

    def close(self) -> None:
        self.model = self.tokenizer = None

    def generate(self, images: Sequence[np.ndarray], conversation: Conversation,
                 options: GenerateOptions) -> list[Generation]:
        self.load()
        import torch

        query = self.settings.query_prefix + conversation.turns[-1].user
        results = []
        with tempfile.TemporaryDirectory(prefix="geopixel-") as folder:
            for index, image in enumerate(images):
                options.check_cancel()
                path = Path(folder) / f"tile{index}.png"
                path.write_bytes(png_bytes(image))
                start = time.perf_counter()
                with torch.inference_mode():
                    text, masks = self.model.evaluate(
                        self.tokenizer, query, images=[str(path)], hd_num=self.settings.hd_num,
                        max_new_tokens=options.max_new_tokens,
                    )
                stack = None
                if masks is not None and len(masks) and masks[0] is not None:
                    stack = masks[0].float().cpu().numpy()
                results.append(Generation(text=text.strip(), masks=stack,
                                          seconds=time.perf_counter() - start))
                if options.on_token is not None:
                    options.on_token(index, text)
        return results
