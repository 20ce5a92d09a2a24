"""GeoPixel's configuration: the three parts' configs, read from config.json and the tensor shapes.

GeoPixel-7B's config.json describes only the language model (IXC-2.5's InternLM2 keys, plus
``out_dim``); GeoPixel builds the CLIP tower and SAM-2 from hub names. So every size comes from
the checkpoint's tensors where a tensor shows it, and each part's config reads its own
(:meth:`InternLM2Config.from_checkpoint`, :meth:`IXCVisionConfig.from_checkpoint`,
:meth:`Sam2Config.from_checkpoint`): any checkpoint in the published layout loads, tiny or 7B.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ...errors import ModelError
from .decoder import InternLM2Config
from .json_files import read_json_object
from .sam2_config import FCS_PREFIX, VISUAL_PREFIX, Sam2Config
from .vision import CLIP_PREFIX, IXCVisionConfig

CONFIG_FILE = "config.json"
DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}


def read_config_json(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict; a ModelError saying what to do when absent or broken."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{folder} has no {CONFIG_FILE}: point to the folder of a GeoPixel checkpoint "
                         "(MBZUAI/GeoPixel-7B as downloaded, or converted with 'models get').")
    return read_json_object(path, str(path))


@dataclass(frozen=True)
class GeoPixelConfig:
    """Sizes of the language model, the image encoder and the mask head, plus the special ids."""

    text: InternLM2Config
    vision: IXCVisionConfig
    sam2: Sam2Config
    bos_token_id: int = 1
    eos_token_id: int = 2
    max_length: int = 16384  # GeoPixel truncates the prompt embeddings to this many positions
    stored_dtype: str = "bfloat16"  # as config.json's torch_dtype says the shards hold

    @classmethod
    def from_checkpoint(cls, hf_config: Mapping[str, Any],
                        shapes: Mapping[str, tuple[int, ...]]) -> "GeoPixelConfig":
        """The config of a checkpoint: ``hf_config`` is config.json, ``shapes`` full name -> shape."""
        if not any(name.startswith(VISUAL_PREFIX) for name in shapes) or FCS_PREFIX + "0.0.weight" not in shapes:
            raise ModelError("This checkpoint has no SAM-2 mask head (model.visual_model.*, "
                             "model.text_hidden_fcs.*): it is not GeoPixel (an InternLM-XComposer "
                             "checkpoint?). Use MBZUAI/GeoPixel-7B or GeoPixel-7B-RES.")
        if not any(name.startswith(CLIP_PREFIX) for name in shapes):
            raise ModelError("This checkpoint has no CLIP tower (vit.vision_tower.vision_model.*): it is "
                             "incomplete or not GeoPixel's layout; download it again.")
        text = InternLM2Config.from_checkpoint(hf_config, shapes)
        vision = IXCVisionConfig.from_checkpoint(hf_config, shapes)
        sam2 = Sam2Config.from_checkpoint(hf_config, shapes)
        if vision.proj_out != text.hidden_size:
            raise ModelError(f"The projector gives {vision.proj_out}-wide image tokens but the language "
                             f"model is {text.hidden_size} wide: the checkpoint's parts do not belong together.")
        dtype = str(hf_config.get("torch_dtype") or "bfloat16")
        return cls(text=text, vision=vision, sam2=sam2,
                   bos_token_id=_int(hf_config, "bos_token_id", 1),
                   eos_token_id=_int(hf_config, "eos_token_id", 2),
                   max_length=_int(hf_config, "max_length", 16384),
                   stored_dtype=dtype if dtype in DTYPES else "bfloat16")


def _int(hf_config: Mapping[str, Any], key: str, default: int) -> int:
    value = hf_config.get(key, default)
    if isinstance(value, list):  # generation configs may list several ids
        value = value[0] if value else default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ModelError(f"config.json's {key} is {value!r}, not a whole number; fix config.json.") from None
