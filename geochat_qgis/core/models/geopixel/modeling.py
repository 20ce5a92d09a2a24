"""GeoPixel as one model: a tile and a question in, the reply and one mask per ``[SEG]`` out.

:class:`GeoPixelModel` composes the three parts as GeoPixel's ``evaluate`` runs them: the image
side (:mod:`.vision`: HD transform, CLIP, separators, projector) gives the image embeddings; the
prompt (:mod:`.prompt`) puts them after the BOS; the decoder answers greedily with a KV cache
(:mod:`.generate`), keeping the normed hidden state where ``[SEG]`` is the input token; the mask
head (:mod:`.sam2`) turns each into mask logits at the tile's own size. Several tiles can go in
one call (:meth:`answer_many`): one CLIP batch, one left-padded decoding batch, one SAM-2 batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ...cancel import CancelToken
from ...errors import ModelError
from .config import GeoPixelConfig, read_config_json
from .decoder import InternLM2Decoder
from .generate import generate_batch, reply_text
from .hd_transform import DEFAULT_HD_NUM, MAX_TILE_SIDE, image_token_count
from .prompt import assemble_prompt, build_prompt_ids
from .sam2 import GeoPixelSam2
from .tokenizer import InternLM2Tokenizer
from .vision import IXCVision
from .weights import checkpoint_files, checkpoint_shapes, load_parts, route

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
History = Sequence[tuple[str, str]]


@dataclass
class GeoPixelAnswer:
    """One reply: GeoPixel's text, the generated ids, why it stopped ("eos" / "length"), float32
    mask logits (n_SEG, H, W) at the tile's size, the [SEG] queries (n_SEG, hidden) and, when
    asked, the logits of every step (n_steps, vocab)."""

    text: str
    token_ids: list[int]
    stop: str
    mask_logits: np.ndarray
    seg_hidden: np.ndarray
    prompt_tokens: int = 0
    step_logits: Optional[np.ndarray] = None


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else mps when available, else cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ModelError(f"Unknown device {device!r}: use auto, cpu, cuda (or cuda:N) or mps.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was asked for but this torch sees no CUDA GPU "
                         f"(torch {torch.__version__}); use device cpu, or install torch with CUDA.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("device 'mps' was asked for but this torch has no Apple MPS; use device cpu.")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    """``bfloat16`` (GeoPixel's own type) or ``float32`` (exact, twice the memory)."""
    if dtype not in DTYPES:
        raise ModelError(f"Unknown dtype {dtype!r}: use bfloat16 or float32.")
    return DTYPES[dtype]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder read up to its tensors' names and shapes (no tensor data)."""

    folder: Path
    files: list[Path]
    shapes: dict[str, tuple[int, ...]]
    config: GeoPixelConfig


def read_checkpoint(folder: Path | str) -> Checkpoint:
    """The files, shapes and config of a GeoPixel folder; ModelError when it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder: give the folder of a GeoPixel checkpoint.")
    files = checkpoint_files(folder)
    shapes = checkpoint_shapes(files)
    return Checkpoint(folder, files, shapes, GeoPixelConfig.from_checkpoint(read_config_json(folder), shapes))


class GeoPixelModel:
    """The loaded model: tokenizer, decoder, image side and mask head on one device and dtype."""

    def __init__(self, config: GeoPixelConfig, tokenizer: InternLM2Tokenizer, decoder: InternLM2Decoder,
                 vision: IXCVision, sam2: GeoPixelSam2) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.decoder, self.vision, self.sam2 = decoder, vision, sam2
        self.seg_id = tokenizer.token_to_id("[SEG]")
        if self.seg_id == tokenizer.token_to_id(tokenizer.unk_token) or self.seg_id >= config.text.vocab_size:
            raise ModelError(f"The tokenizer's [SEG] (id {self.seg_id}) is not one of the model's "
                             f"{config.text.vocab_size} tokens: the tokenizer files (added_tokens.json) "
                             "belong to another model; download the model again with its tokenizer.")

    @classmethod
    def from_folder(cls, folder: Path | str, *, device: str = "cpu", dtype: str = "bfloat16",
                    cancel: Optional[CancelToken] = None) -> "GeoPixelModel":
        """Load a GeoPixel checkpoint folder (published .bin shards or converted safetensors)."""
        return cls.load(read_checkpoint(folder), device=device, dtype=dtype, cancel=cancel)

    @classmethod
    def load(cls, checkpoint: "Checkpoint", *, device: str = "cpu", dtype: str = "bfloat16",
             cancel: Optional[CancelToken] = None) -> "GeoPixelModel":
        """Build the parts on ``meta`` and fill them from the checkpoint's files (one read each)."""
        config = checkpoint.config
        tokenizer = InternLM2Tokenizer(checkpoint.folder)
        target, torch_dtype = resolve_device(device), resolve_dtype(dtype)
        with torch.device("meta"):
            parts = {"text": InternLM2Decoder(config.text), "vision": IXCVision(config.vision),
                     "sam2": GeoPixelSam2(config.sam2)}
        for module in parts.values():
            module.to(dtype=torch_dtype)
        load_parts(checkpoint.files, parts, device=target, dtype=torch_dtype, cancel=cancel)
        for module in parts.values():
            module.eval().requires_grad_(False)
        return cls(config, tokenizer, parts["text"], parts["vision"], parts["sam2"])

    @property
    def device(self) -> torch.device:
        return self.vision.device

    def reply(self, token_ids: Sequence[int]) -> str:
        """GeoPixel's reply text for generated ids (for streaming: the text so far)."""
        return reply_text(self.tokenizer, token_ids)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.dtype

    def answer(self, image: np.ndarray, query: str, history: History = (), max_new_tokens: int = 512, *,
               cancel: Optional[CancelToken] = None, on_token: Optional[Callable[[int], None]] = None,
               want_logits: bool = False, hd_num: int = DEFAULT_HD_NUM) -> GeoPixelAnswer:
        """GeoPixel's ``evaluate`` for one (H, W, 3) uint8 tile: reply and (n_SEG, H, W) mask logits."""
        each = None if on_token is None else (lambda _row, _step, token: on_token(token))
        return self.answer_many([image], [query], [history], max_new_tokens, cancel=cancel, on_token=each,
                                want_logits=want_logits, hd_num=hd_num)[0]

    @torch.no_grad()
    def answer_many(self, images: Sequence[np.ndarray], queries: Sequence[str],
                    histories: Optional[Sequence[History]] = None, max_new_tokens: int = 512, *,
                    cancel: Optional[CancelToken] = None,
                    on_token: Optional[Callable[[int, int, int], None]] = None, want_logits: bool = False,
                    hd_num: int = DEFAULT_HD_NUM) -> list[GeoPixelAnswer]:
        """Several tiles at once (each with its own question and history); ``on_token(tile, step, id)``."""
        histories = list(histories) if histories is not None else [()] * len(images)
        if not (len(images) == len(queries) == len(histories)):
            raise ModelError("answer_many needs one query and one history per image.")
        embeds = self.vision.embed_many(images, hd_num)
        prompts = []
        for image_embeds, query, history in zip(embeds, queries, histories):
            pieces = build_prompt_ids(self.tokenizer, query, history)
            prompts.append(assemble_prompt(self.decoder.embed, pieces, image_embeds.to(self.dtype),
                                           self.config.max_length))
        if cancel is not None:
            cancel.raise_if_cancelled()
        generations = generate_batch(self.decoder, self.tokenizer, prompts, max_new_tokens, seg_id=self.seg_id,
                                     eos_id=self.config.eos_token_id, return_logits=want_logits,
                                     cancel=cancel, on_token=on_token)
        features = self.sam2.encode_tiles(images) if any(len(g.seg_hidden) for g in generations) else None
        answers = []
        for index, (image, generation) in enumerate(zip(images, generations)):
            if features is not None and len(generation.seg_hidden):
                masks = self.sam2.decode(features, index, generation.seg_hidden)[2]
            else:
                masks = torch.zeros((0, *image.shape[:2]))
            answers.append(GeoPixelAnswer(
                text=generation.text, token_ids=list(generation.token_ids), stop=generation.stop,
                prompt_tokens=int(prompts[index][0].shape[-2]),
                mask_logits=masks.float().cpu().numpy(), seg_hidden=generation.seg_hidden.float().cpu().numpy(),
                step_logits=None if generation.step_logits is None else generation.step_logits.float().cpu().numpy()))
        return answers


def weights_bytes(shapes: dict[str, tuple[int, ...]], dtype: str) -> int:
    """Bytes the used tensors take in ``dtype`` (the skipped ones are never loaded)."""
    width = torch.tensor([], dtype=resolve_dtype(dtype)).element_size()
    return sum(math.prod(shape) * width for name, shape in shapes.items() if route(name) is not None)


def activation_bytes(config: GeoPixelConfig, batch: int, dtype: str, max_new_tokens: int = 512) -> int:
    """A generous estimate of the working memory of ``batch`` 1680 px tiles answered at once: the
    KV cache and the prefill's feed-forward / attention rows (the largest step), plus CLIP and
    SAM-2 activations (about 1 GB at GeoPixel-7B's widths, less for smaller models)."""
    t = config.text
    width = 2 if dtype == "bfloat16" else 4
    length = image_token_count(MAX_TILE_SIDE, MAX_TILE_SIDE) + 64 + max_new_tokens
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * length * width
    prefill = length * (3 * t.intermediate_size + 8 * t.hidden_size) * 4
    images = int(1e9 * max(t.hidden_size / 4096, 0.05))
    return batch * (kv + max(prefill, images))
