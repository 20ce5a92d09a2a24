"""Tiny random-weight GeoChat models for tests and demos, built offline in about a second.

``build_tiny_geochat(outdir, fmt)`` writes one of:

- ``geochat-checkpoint``: a checkpoint laid out the way GeoChat saves its weights
  (``model_type: geochat``, ``model.mm_projector.*``, a stale ``model.vision_tower.*`` copy with
  a 1297-row table, rotary ``inv_freq`` buffers, two pickle ``.bin`` shards with an index, a
  SentencePiece ``tokenizer.model`` trained offline) and a tiny CLIP-336-style checkpoint in
  ``clip/`` (336 px, patch 14: the same 24x24+1 position grid as the real one);
- ``hf``: that checkpoint through :func:`convert_geochat_to_hf` (a LLaVA folder, 504 px);
- ``gguf``: that checkpoint through :func:`convert_geochat_to_gguf`: ``model.gguf`` (text) and
  ``mmproj.gguf`` (vision, 504 px) in one folder.

Everything is written from numpy (no torch): the ``.bin`` shards by torch_zip_writer in the
format ``torch.save`` writes, the CLIP weights by the project's safetensors writer. The same
seed gives the same weights and tokenizer.
"""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ModelError
from ..families.llava_v1 import SYSTEM
from .convert_hf import convert_geochat_to_hf
from .geochat_checkpoint import CLIP_336_NAME
from .gguf_writer import convert_geochat_to_gguf
from .output_dir import staged_output_dir
from .safetensors_stream import SafetensorsStreamWriter
from .tensor_data import TensorData
from .torch_zip_writer import save_state_dict

FORMATS = ("geochat-checkpoint", "hf", "gguf")

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
          "num_attention_heads": 2, "image_size": 336, "patch_size": 14}
SP_VOCAB = 512
HEAD_DIM = 16  # TEXT's; vLLM's CPU attention takes head_dim >= 32 (GeoChat-7B's is 128)

_WORDS = ("building road river field forest car ship airplane harbour bridge tree house farm lake "
          "tank runway parking roundabout stadium solar panel storage vehicle small large white red "
          "image region object location describe classify answer question single word phrase").split()


def _corpus() -> list[str]:
    """Deterministic training text in GeoChat's prompt language (no newlines: Llama byte-falls them)."""
    lines = [SYSTEM] * 8
    for i, word in enumerate(_WORDS):
        other = _WORDS[(i * 7 + 3) % len(_WORDS)]
        for j in range(0, 101, 9):
            lines.append(f"USER: [refer] Give me the location of <p> {word} </p> ASSISTANT:")
            lines.append(f"<p>{word}</p> {{<{j}><{(j * 3) % 101}><{(j + 11) % 101}><{(j * 7) % 101}>|<{j % 90}>}}</s>")
            lines.append(f"[grounding]What is the {word} near the {other}? There are {j} {word}s.")
    return lines


def train_tokenizer(vocab_size: int = SP_VOCAB) -> bytes:
    """A Llama-style SentencePiece BPE model (byte fallback, split digits, <unk> <s> </s>)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


class _Init:
    """Random float32 tensors with scales that keep activations O(1) and greedy margins wide."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def normal(self, *shape: int, std: float = 1.0, mean: float = 0.0) -> np.ndarray:
        return (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean))

    def linear(self, out: int, fan_in: int, gain: float = 1.0) -> np.ndarray:
        return self.normal(out, fan_in, std=gain / fan_in ** 0.5)


def _clip_vision_state(init: _Init, prefix: str, grid: int) -> dict:
    d, ff = VISION["hidden_size"], VISION["intermediate_size"]
    p = VISION["patch_size"]
    state = {
        f"{prefix}embeddings.class_embedding": init.normal(d),
        f"{prefix}embeddings.patch_embedding.weight": init.normal(d, 3, p, p, std=(3 * p * p) ** -0.5),
        f"{prefix}embeddings.position_embedding.weight": init.normal(grid * grid + 1, d, std=0.5),
        f"{prefix}pre_layrnorm.weight": init.normal(d, std=0.1, mean=1.0),
        f"{prefix}pre_layrnorm.bias": init.normal(d, std=0.1),
        f"{prefix}post_layernorm.weight": init.normal(d, std=0.1, mean=1.0),
        f"{prefix}post_layernorm.bias": init.normal(d, std=0.1),
    }
    for i in range(VISION["num_hidden_layers"]):
        layer = f"{prefix}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{layer}self_attn.{name}.weight"] = init.linear(d, d)
            state[f"{layer}self_attn.{name}.bias"] = init.normal(d, std=0.05)
        for name in ("layer_norm1", "layer_norm2"):
            state[f"{layer}{name}.weight"] = init.normal(d, std=0.1, mean=1.0)
            state[f"{layer}{name}.bias"] = init.normal(d, std=0.1)
        state[f"{layer}mlp.fc1.weight"] = init.linear(ff, d)
        state[f"{layer}mlp.fc1.bias"] = init.normal(ff, std=0.05)
        state[f"{layer}mlp.fc2.weight"] = init.linear(d, ff)
        state[f"{layer}mlp.fc2.bias"] = init.normal(d, std=0.05)
    return state


def write_safetensors(path: Path, state: dict[str, np.ndarray]) -> None:
    """``state`` (float32 arrays) as one safetensors file, as ``safetensors.torch.save_file``
    lays it out (tensors in name order)."""
    names = sorted(state)
    writer = SafetensorsStreamWriter(path, [(name, state[name].shape, "float32") for name in names])
    for name in names:
        writer.write(name, TensorData(np.ascontiguousarray(state[name], dtype="<f4"), "float32"))
    writer.close()


def _write_clip(folder: Path, init: _Init) -> None:
    folder.mkdir(parents=True)
    grid = VISION["image_size"] // VISION["patch_size"]
    state = _clip_vision_state(init, "vision_model.", grid)
    state["visual_projection.weight"] = init.linear(16, VISION["hidden_size"])  # CLIPModel extras,
    state["logit_scale"] = np.array(2.6592, dtype=np.float32)  # ignored by the conversion
    write_safetensors(folder / "model.safetensors", state)
    vision = {**VISION, "model_type": "clip_vision_model", "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5, "projection_dim": 16}
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 16,
              "vision_config": vision, "_name_or_path": CLIP_336_NAME}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    size = VISION["image_size"]
    preprocessor = {"crop_size": size, "size": size, "do_center_crop": True, "do_normalize": True,
                    "do_resize": True, "resample": 3, "image_processor_type": "CLIPImageProcessor",
                    "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")


def text_sizes(head_dim: int = HEAD_DIM) -> dict:
    """TEXT with ``head_dim``-wide attention heads: as wide (fewer heads) up to 64, then one head
    ``head_dim`` wide. HEAD_DIM gives TEXT itself (the same weights as before the option)."""
    hidden = max(TEXT["hidden_size"], head_dim)
    if head_dim < 2 or head_dim % 2 or hidden % head_dim:
        raise ModelError(f"head_dim {head_dim} does not fit the tiny model: use an even divisor "
                         f"of {TEXT['hidden_size']} (16, 32, 64) or a larger even number (128).")
    heads = hidden // head_dim
    return {**TEXT, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_attention_heads": heads, "num_key_value_heads": heads}


def _geochat_state(init: _Init, text: dict = TEXT) -> tuple[dict, dict]:
    """The two shards of the GeoChat checkpoint, keyed as GeoChatLlamaForCausalLM saves them."""
    h, ff = text["hidden_size"], text["intermediate_size"]
    head_dim = h // text["num_attention_heads"]
    first = {"model.embed_tokens.weight": init.normal(SP_VOCAB, h)}
    second = {}
    for i in range(text["num_hidden_layers"]):
        shard = first if i == 0 else second
        layer = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shard[f"{layer}self_attn.{name}.weight"] = init.linear(h, h)
        shard[f"{layer}self_attn.rotary_emb.inv_freq"] = np.float32(1.0) / (
            np.float32(10000) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
        shard[f"{layer}mlp.gate_proj.weight"] = init.linear(ff, h)
        shard[f"{layer}mlp.up_proj.weight"] = init.linear(ff, h)
        shard[f"{layer}mlp.down_proj.weight"] = init.linear(h, ff)
        shard[f"{layer}input_layernorm.weight"] = init.normal(h, std=0.1, mean=1.0)
        shard[f"{layer}post_attention_layernorm.weight"] = init.normal(h, std=0.1, mean=1.0)
    second["model.norm.weight"] = init.normal(h, std=0.1, mean=1.0)
    second["lm_head.weight"] = init.linear(SP_VOCAB, h, gain=6.0)
    second["model.mm_projector.0.weight"] = init.linear(h, VISION["hidden_size"], gain=2.0)
    second["model.mm_projector.0.bias"] = init.normal(h, std=0.1)
    second["model.mm_projector.2.weight"] = init.linear(h, h, gain=2.0)
    second["model.mm_projector.2.bias"] = init.normal(h, std=0.1)
    # The tower GeoChat saved (already interpolated to 36x36+1); its loader replaces it.
    second.update(_clip_vision_state(init, "model.vision_tower.vision_tower.vision_model.", 36))
    return first, second


def geochat_config(text: dict = TEXT) -> dict:
    """``config.json`` of the tiny GeoChat checkpoint, keys as GeoChat writes them."""
    return {
        "_name_or_path": "geochat-tiny", "architectures": ["GeoChatLlamaForCausalLM"],
        "model_type": "geochat", **text, "vocab_size": SP_VOCAB, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "initializer_range": 0.02, "pretraining_tp": 1,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
        "torch_dtype": "float32", "use_cache": True, "transformers_version": "4.31.0",
        "image_aspect_ratio": "pad", "mm_hidden_size": VISION["hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": True,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": CLIP_336_NAME,
        "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "use_mm_proj": True,
    }


def write_tiny_geochat_checkpoint(folder: Path, seed: int = 0, head_dim: int = HEAD_DIM) -> Path:
    """Write the GeoChat-layout checkpoint (plus ``clip/``) into ``folder`` (new or empty);
    ``head_dim``: the text model's attention head width (:func:`text_sizes`)."""
    text = text_sizes(head_dim)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    init = _Init(seed)
    _write_clip(folder / "clip", init)
    shards = _geochat_state(init, text)
    names = [f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_state_dict(shard, folder / name)
        weight_map.update({key: name for key in shard})
    total = sum(t.nbytes for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(geochat_config(text), indent=2), encoding="utf-8")
    (folder / "tokenizer.model").write_bytes(train_tokenizer())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    tokenizer_config = {**special, "tokenizer_class": "LlamaTokenizer", "legacy": False,
                        "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048,
                        "padding_side": "right", "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return folder


def build_tiny_geochat(outdir: Path, fmt: str = "hf", seed: int = 0, quant: Optional[str] = None,
                       head_dim: int = HEAD_DIM) -> Path:
    """Build a tiny GeoChat in ``outdir`` (a new or empty folder) and return ``outdir``.

    ``fmt``: ``geochat-checkpoint``, ``hf`` or ``gguf``; ``quant`` (gguf only): ``q8_0`` or
    ``q4_k_m`` for a quantised text model. For gguf the folder holds ``model.gguf`` and
    ``mmproj.gguf`` (see :data:`gguf_writer.TEXT_GGUF` and :data:`gguf_writer.MMPROJ_GGUF`).
    ``head_dim``: 32 or more for vLLM's CPU build (:func:`text_sizes`).
    """
    if fmt not in FORMATS:
        raise ModelError(f"Unknown tiny model format {fmt!r}: use one of {', '.join(FORMATS)}.")
    text_sizes(head_dim)  # a bad head_dim is refused before anything is written
    outdir = Path(outdir)
    if fmt == "geochat-checkpoint":
        with staged_output_dir(outdir) as stage:
            write_tiny_geochat_checkpoint(stage, seed, head_dim)
        return outdir
    with tempfile.TemporaryDirectory(prefix="geochat-tiny-") as tmp:
        src = write_tiny_geochat_checkpoint(Path(tmp) / "geochat", seed, head_dim)
        if fmt == "hf":
            return convert_geochat_to_hf(src, outdir)

        return convert_geochat_to_gguf(src, outdir, quant=quant)
