"""A GeoChat checkpoint and the CLIP-336 tower it runs with: layout, configuration, validation.

GeoChat (``GeoChatLlamaForCausalLM``, ``model_type: geochat``) saves a Llama language model, the
``mlp2x_gelu`` projector under ``model.mm_projector.*`` and a copy of its vision tower under
``model.vision_tower.*``. Its loader discards that copy and rebuilds the tower from
``mm_vision_tower`` (stock CLIP-336, position table interpolated to 504 px), so conversion takes
the CLIP-336 checkpoint as a second input. Everything here reads metadata only: a checkpoint is
validated completely before anything is written.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import ModelError
from .catalog import load_catalog
from .checkpoint_io import TensorMeta, checkpoint_metadata, weight_files
from .store import model_status

CLIP_336_NAME = "openai/clip-vit-large-patch14-336"
GEOCHAT_IMAGE_SIZE = 504  # clip_encoder.py: clip_interpolate_embeddings(image_size=504, patch_size=14)
IMAGE_PATCH_TOKEN = "<im_patch>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"

_LAYER_KEYS = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
)
_CLIP_LAYER_KEYS = tuple(
    f"{part}.{kind}"
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
    for kind in ("weight", "bias")
)
# Tensors GeoChat's loader ignores or recomputes: rotary caches and the saved vision tower copy.
_IGNORED_GEOCHAT_KEYS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$|^model\.vision_tower\.")
# CLIPModel checkpoints hold the text tower and projections too; only the vision model is used.
_IGNORED_CLIP_KEYS = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale$)"
                                r"|position_ids$")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder} has no config.json; point to the checkpoint folder itself.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); download it again.") from exc


def _check_keys(what: str, found: set[str], expected: set[str], ignored: re.Pattern) -> None:
    missing = sorted(expected - found)
    unexpected = sorted(k for k in found - expected if not ignored.search(k))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:3])}")
        raise ModelError(
            f"{what} does not match its config.json: {'; '.join(parts)}. "
            "It is incomplete or not the model it claims to be; download it again."
        )


def _check_shape(metas: dict[str, TensorMeta], name: str, shape: tuple[int, ...]) -> None:
    if metas[name].shape != shape:
        raise ModelError(
            f"Tensor {name} has shape {list(metas[name].shape)}, its config implies {list(shape)}; "
            "the checkpoint and its config.json do not belong together."
        )


@dataclass
class ClipCheckpoint:
    """The CLIP-336 vision tower GeoChat rebuilds from ``mm_vision_tower``."""

    path: Path
    vision: dict[str, Any]
    metas: dict[str, TensorMeta]
    prefix: str = "vision_model."

    @property
    def num_layers(self) -> int:
        return int(self.vision["num_hidden_layers"])

    @property
    def grid(self) -> int:
        """Side of the source position grid (24 for CLIP-336)."""
        return int(self.vision["image_size"]) // int(self.vision["patch_size"])

    def expected_keys(self) -> set[str]:
        p = self.prefix
        keys = {f"{p}embeddings.class_embedding", f"{p}embeddings.patch_embedding.weight",
                f"{p}embeddings.position_embedding.weight", f"{p}pre_layrnorm.weight",
                f"{p}pre_layrnorm.bias", f"{p}post_layernorm.weight", f"{p}post_layernorm.bias"}
        for i in range(self.num_layers):
            keys.update(f"{p}encoder.layers.{i}.{k}" for k in _CLIP_LAYER_KEYS)
        return keys


def open_clip_checkpoint(folder: Path) -> ClipCheckpoint:
    """Validate a CLIP checkpoint folder (CLIPModel or CLIPVisionModel) and read its metadata."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(
            f"CLIP checkpoint {folder} not found: download {CLIP_336_NAME} and pass its folder "
            "with --clip."
        )
    config = _read_config(folder)
    vision = config.get("vision_config", config)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "image_size", "patch_size"):
        if key not in vision:
            raise ModelError(f"{folder}/config.json lacks vision setting {key!r}; it is not a CLIP checkpoint.")
    clip = ClipCheckpoint(folder, vision, checkpoint_metadata(weight_files(folder)))
    _check_keys(f"CLIP checkpoint {folder}", set(clip.metas), clip.expected_keys(), _IGNORED_CLIP_KEYS)
    side = clip.grid
    hidden = int(vision["hidden_size"])
    _check_shape(clip.metas, f"{clip.prefix}embeddings.position_embedding.weight", (side * side + 1, hidden))
    return clip


@dataclass
class GeoChatCheckpoint:
    """A GeoChat checkpoint folder, validated, with the metadata of every tensor."""

    path: Path
    config: dict[str, Any]
    metas: dict[str, TensorMeta]
    clip: ClipCheckpoint

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def checkpoint_vocab(self) -> int:
        """Rows of the saved embedding matrix."""
        return self.metas["model.embed_tokens.weight"].shape[0]

    @property
    def dtype(self) -> str:
        return self.metas["model.embed_tokens.weight"].dtype

    def added_tokens(self) -> list[str]:
        """Tokens GeoChat's loader adds to the tokenizer, in order (geochat/model/builder.py)."""
        tokens = []
        if self.config.get("mm_use_im_patch_token", True):  # the loader's default is True
            tokens.append(IMAGE_PATCH_TOKEN)
        if self.config.get("mm_use_im_start_end", False):
            tokens += [IM_START_TOKEN, IM_END_TOKEN]
        return tokens

    def expected_keys(self) -> set[str]:
        keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                "model.mm_projector.0.weight", "model.mm_projector.0.bias",
                "model.mm_projector.2.weight", "model.mm_projector.2.bias"}
        for i in range(self.num_layers):
            keys.update(f"model.layers.{i}.{k}" for k in _LAYER_KEYS)
        return keys


def _check_geochat_config(folder: Path, config: dict[str, Any]) -> None:
    if config.get("model_type") not in ("geochat", "llava", "llava_llama"):
        raise ModelError(
            f"{folder} is a {config.get('model_type')!r} checkpoint, not GeoChat "
            "(config.json model_type 'geochat'); point to the GeoChat folder."
        )
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ModelError(f"{folder}: projector {projector!r} is not GeoChat's mlp2x_gelu; cannot convert it.")
    if config.get("mm_vision_select_feature", "patch") != "patch":
        raise ModelError(f"{folder}: only mm_vision_select_feature 'patch' (GeoChat's) is supported.")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "mm_hidden_size"):
        if key not in config:
            raise ModelError(f"{folder}/config.json lacks {key!r}; it is not a complete GeoChat config.")


CLIP_336_CATALOG_NAME = "clip-vit-large-patch14-336"


def default_clip_folder(src: Path) -> Optional[Path]:
    """The CLIP-336 folder to use when none is given: ``clip/`` inside the checkpoint, else the
    catalog's CLIP-336 entry once downloaded."""
    candidate = Path(src) / "clip"
    if candidate.is_dir():
        return candidate

    catalog = load_catalog()
    if CLIP_336_CATALOG_NAME in catalog:
        entry = catalog.get(CLIP_336_CATALOG_NAME)
        if model_status(entry) == "installed":
            return entry.local_dir()
    return None


def open_geochat_checkpoint(src: Path, clip: Optional[Path] = None) -> GeoChatCheckpoint:
    """Validate ``src`` (and its CLIP-336 tower) completely; raises ModelError on any problem.

    ``clip`` defaults to ``src/clip``. Reads only metadata: shapes, dtypes and key names of every
    shard, refusing truncated shards and pickles that would run code.
    """
    src = Path(src)
    if not src.is_dir():
        raise ModelError(f"GeoChat checkpoint {src} not found; download MBZUAI/geochat-7B first.")
    config = _read_config(src)
    _check_geochat_config(src, config)
    clip_folder = Path(clip) if clip else default_clip_folder(src)
    if clip_folder is None:
        raise ModelError(
            f"GeoChat runs with the stock {CLIP_336_NAME} vision tower, which {src} does not contain: "
            f"download it (python -m geochat_qgis models download {CLIP_336_CATALOG_NAME}) or "
            "pass its folder with --clip."
        )
    clip_ckpt = open_clip_checkpoint(clip_folder)
    metas = checkpoint_metadata(weight_files(src))
    ckpt = GeoChatCheckpoint(src, config, metas, clip_ckpt)
    _check_keys(f"GeoChat checkpoint {src}", set(metas), ckpt.expected_keys(), _IGNORED_GEOCHAT_KEYS)
    hidden, mm_hidden = ckpt.hidden_size, int(config["mm_hidden_size"])
    if int(clip_ckpt.vision["hidden_size"]) != mm_hidden:
        raise ModelError(
            f"The CLIP tower in {clip_folder} has width {clip_ckpt.vision['hidden_size']}, GeoChat's "
            f"projector expects {mm_hidden}: pass the {CLIP_336_NAME} checkpoint with --clip."
        )
    _check_shape(metas, "model.mm_projector.0.weight", (hidden, mm_hidden))
    _check_shape(metas, "model.mm_projector.2.weight", (hidden, hidden))
    _check_shape(metas, "lm_head.weight", (ckpt.checkpoint_vocab, hidden))
    return ckpt
