"""A random-weight GeoPixel in the published checkpoint's exact layout, built offline in seconds.

``write_tiny_geopixel(folder)`` writes what ``MBZUAI/GeoPixel-7B`` publishes: ``config.json``
(GeoPixel-7B's keys, the sizes of this model), ``generation_config.json``,
``pytorch_model-0000k-of-00003.bin`` (``torch.save`` of plain state dicts) with
``pytorch_model.bin.index.json``, and the tokenizer files (``tokenizer.model`` with ``[SEG]``,
``<p>``, ``</p>`` added). Every tensor GeoPixel's model holds is there (:mod:`.layout`), the dead
adapters ``lora_sft`` / ``lora_dpo`` / ``lora_web`` and SAM-2's video-memory modules included,
so the loader meets the same names as in the real checkpoint. The same seed gives the same bytes.

Presets: ``tiny`` (float32, hidden 64, CLIP 128 wide, Hiera 8 wide: runs a 1680 px tile in
seconds on a CPU) and ``real-width`` (bfloat16, GeoPixel-7B's widths, vocabulary, CLIP-L/14 and
Hiera-L, with ``layers`` decoder layers; for benchmarks). ``seg_answer`` makes greedy decoding
answer ``<p> a </p> [SEG]`` after any question (then ``</s>``, or once more with
``seg_answer="twice"``), so a demo shows masks becoming polygons.
"""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Iterator, Mapping, Optional

import numpy as np
import torch

from ...errors import ModelError
from . import sam2_random
from .decoder import InternLM2Config
from .layout import LORA_RANK, checkpoint_layout
from .sam2_config import Sam2Config
from .tokenizer import InternLM2Tokenizer, write_tiny_tokenizer
from .vision import IXCVisionConfig

PRESETS = ("tiny", "real-width")
SHARDS = 3
INDEX_FILE = "pytorch_model.bin.index.json"
SEG_ANSWERS = (False, True, "once", "twice")

TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}
TINY_VISION = {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "intermediate_size": 256,
               "proj_mid": 64, "proj_out": 64}
REAL_TEXT = {"vocab_size": 92547, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8}
ROPE = {"rope_theta": 1000000.0, "rope_scaling_type": "dynamic", "rope_scaling_factor": 2.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 24576, "bias": False}


def preset_configs(preset: str, vocab: int,
                   layers: Optional[int] = None) -> tuple[InternLM2Config, IXCVisionConfig, Sam2Config]:
    """The parts' configs of a preset; ``vocab`` is the tiny tokenizer's size (tiny preset only)."""
    if preset not in PRESETS:
        raise ModelError(f"Unknown GeoPixel preset {preset!r}: use one of {', '.join(PRESETS)}.")
    if layers is not None and layers < 1:
        raise ModelError(f"--layers must be at least 1, got {layers}.")
    sizes = {**TINY_TEXT, "vocab_size": vocab} if preset == "tiny" else dict(REAL_TEXT)
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    text = InternLM2Config(**sizes, lora_r=LORA_RANK, **ROPE)
    if preset == "tiny":
        return text, IXCVisionConfig(**TINY_VISION), Sam2Config.tiny(text.hidden_size)
    return text, IXCVisionConfig(), Sam2Config(hidden_size=text.hidden_size)


def geopixel_config(text: InternLM2Config, out_dim: int, dtype: str) -> dict:
    """``config.json`` with the keys GeoPixel-7B's has (IXC-2.5's, saved by transformers 4.33)."""
    return {
        "_name_or_path": "geopixel-tiny",
        "architectures": ["GeoPixelForCausalLM"],
        "attn_implementation": "flash_attention_2",
        "auto_map": {
            "AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
            "AutoModel": "geopixel.GeoPixelForCausalLM",
            "AutoModelForCausalLM": "geopixel.GeoPixelForCausalLM",
        },
        "bias": text.bias, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": text.hidden_size, "initializer_range": 0.02, "intermediate_size": text.intermediate_size,
        "max_length": 16384, "max_position_embeddings": text.max_position_embeddings, "model_type": "internlm2",
        "num_attention_heads": text.num_attention_heads, "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads, "out_dim": out_dim, "pad_token_id": 0,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": {"factor": text.rope_scaling_factor, "type": text.rope_scaling_type},
        "rope_theta": int(text.rope_theta), "tie_word_embeddings": False, "torch_dtype": dtype,
        "train_mask_decoder": True, "transformers_version": "4.33.2", "use_cache": False,
        "vocab_size": text.vocab_size,
    }


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The float32 tensor ``name`` of a random GeoPixel drawn with ``seed``: a function of
    (seed, name, shape) only. SAM-2 and text_hidden_fcs tensors are :mod:`.sam2_random`'s; the
    others keep activations O(1) and greedy margins wide (output head 6 / sqrt(hidden))."""
    if name.startswith(("model.visual_model.", "model.text_hidden_fcs.")):
        return sam2_random.random_tensor(name, shape, seed)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    noise = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith(("tok_embeddings.weight", "class_embedding", "_GN")):
        return noise
    if name == "output.weight":
        return noise * np.float32(6.0 / math.sqrt(shape[1]))
    if name.endswith("position_embedding.weight"):
        return noise * np.float32(0.5)
    if len(shape) == 1:
        return noise * np.float32(0.05) if name.endswith(".bias") else np.float32(1.0) + noise * np.float32(0.1)
    return noise / np.float32(math.sqrt(math.prod(shape[1:])))


def _shard_plan(shapes: Mapping[str, tuple[int, ...]], width: int) -> list[list[str]]:
    """The names split into :data:`SHARDS` consecutive groups of about equal bytes."""
    sizes = {name: math.prod(shape) * width for name, shape in shapes.items()}
    total = sum(sizes.values())
    groups: list[list[str]] = [[] for _ in range(SHARDS)]
    done = 0
    for name, nbytes in sizes.items():
        index = min(SHARDS - 1, done * SHARDS // total)
        groups[index].append(name)
        done += nbytes
    return [group for group in groups if group]


def _seg_chain(tokenizer: InternLM2Tokenizer) -> list[int]:
    """Token ids of the demo answer: the prompt's last token, then ``<p> a </p> [SEG]``."""
    tail = tokenizer.encode("[UNUSED_TOKEN_146]assistant\n")[-1]
    chain = [tail, *tokenizer.encode("<p> a </p> [SEG]")]
    if len(set(chain)) != len(chain):
        raise ModelError(f"The tiny tokenizer encodes the demo answer with a repeated token ({chain}); "
                         "greedy decoding could not follow it.")
    return chain


def _bigram(state: dict[str, torch.Tensor], chain: list[int], repeat: bool, eos: int) -> None:
    """Make greedy decoding follow ``chain`` whatever came before: the output head's row of each
    next token points along the embedding of the token before it; layer outputs are damped."""
    embed = state["model.tok_embeddings.weight"]
    out = state["output.weight"]
    out.mul_(0.2)
    for name, tensor in state.items():
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            tensor.mul_(0.05)
    steps = list(zip(chain, chain[1:])) + [(chain[-1], chain[1] if repeat else eos)]
    for following in {step[1] for step in steps}:
        out[following] = sum(embed[c] / embed[c].norm() for c, f in steps if f == following) * 12.0


def _states(shapes: Mapping[str, tuple[int, ...]], seed: int,
            dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in shapes.items():
        yield name, torch.from_numpy(random_tensor(name, shape, seed)).to(dtype)


def write_tiny_geopixel(folder: Path, *, seed: int = 0, preset: str = "tiny",
                        layers: Optional[int] = None, seg_answer: object = False) -> Path:
    """Write a random GeoPixel checkpoint in the published layout into ``folder`` (new or empty).

    ``seg_answer``: False (random answers), True / ``"once"`` (``<p> a </p> [SEG]</s>``) or
    ``"twice"`` (that answer repeated until max_new_tokens). Returns ``folder``.
    """
    if seg_answer not in SEG_ANSWERS:
        raise ModelError(f"seg_answer must be one of {SEG_ANSWERS}, got {seg_answer!r}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise ModelError(f"{folder} is not empty; choose a new folder for the tiny GeoPixel.")
    vocab = write_tiny_tokenizer(folder, seed=seed)
    text, vision, sam2 = preset_configs(preset, vocab, layers)
    dtype = torch.float32 if preset == "tiny" else torch.bfloat16
    shapes = checkpoint_layout(text, vision, sam2)
    state = dict(_states(shapes, seed, dtype)) if seg_answer else None
    if seg_answer:
        tokenizer = InternLM2Tokenizer(folder)
        _bigram(state, _seg_chain(tokenizer), repeat=seg_answer == "twice", eos=tokenizer.eos_id)
    _write_shards(folder, shapes, seed, dtype, state)
    config = geopixel_config(text, sam2.d_model, str(dtype).replace("torch.", ""))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                  "max_length": 16384, "pad_token_id": 0, "transformers_version": "4.33.2"}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n",
                                                   encoding="utf-8")
    return folder


def _write_shards(folder: Path, shapes: Mapping[str, tuple[int, ...]], seed: int, dtype: torch.dtype,
                  state: Optional[dict[str, torch.Tensor]]) -> None:
    """One shard in memory at a time (real-width: ~1 GB each); the index last."""
    width = torch.tensor([], dtype=dtype).element_size()
    plan = _shard_plan(shapes, width)
    stream = iter(state.items()) if state is not None else _states(shapes, seed, dtype)
    weight_map: dict[str, str] = {}
    for number, names in enumerate(plan, start=1):
        shard_name = f"pytorch_model-{number:05d}-of-{len(plan):05d}.bin"
        shard = {}
        for expected in names:
            name, tensor = next(stream)
            assert name == expected, (name, expected)
            shard[name] = tensor.contiguous()
        torch.save(shard, folder / shard_name)
        weight_map.update(dict.fromkeys(names, shard_name))
        del shard
    total = sum(math.prod(shape) * width for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
