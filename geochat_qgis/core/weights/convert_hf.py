"""GeoChat -> a standard ``LlavaForConditionalGeneration`` folder that needs no custom code.

Safetensors shards (one per source shard, streamed), ``config.json`` (CLIP at 504 px with
GeoChat's interpolated 1297-row position table baked in, layer -2, patch features, GELU
projector, ``rms_norm_eps`` from the checkpoint), the tokenizer with GeoChat's added tokens and
``legacy`` SentencePiece behaviour, and a processor that pads to square with (122, 116, 104),
resizes to 504 with PIL bicubic and carries GeoChat's ``llava_v1`` chat template, ``<s>``
first: OpenAI-compatible servers (vLLM) tokenise the rendered template without adding a BOS.

Load the processor with ``AutoProcessor.from_pretrained(path, backend="pil")``: transformers 5
otherwise switches to a torchvision resize whenever torchvision is importable (models.md 6), and
no config key can say otherwise; vLLM takes the same as ``--mm-processor-kwargs '{"backend":
"pil"}'`` (models/geochat-7b.md).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from ..families.base import CLIP_MEAN, CLIP_STD
from ..families.llava_v1 import IMAGE_TOKEN
from .geochat_checkpoint import GEOCHAT_IMAGE_SIZE, GeoChatCheckpoint, open_geochat_checkpoint
from .geochat_tensors import PlannedTensor, plan_tensors, stream_tensors
from .geochat_tokenizer import HF_CHAT_TEMPLATE, TOKENIZER_MODEL, Vocabulary, geochat_vocabulary
from .output_dir import check_output_dir, staged_output_dir
from .safetensors_stream import SafetensorsStreamWriter

Progress = Callable[[int, int, str], None]  # (tensors done, total, tensor name)


def _text_config(ckpt: GeoChatCheckpoint, vocab: Vocabulary) -> dict:
    c = ckpt.config
    heads = int(c["num_attention_heads"])
    return {
        "model_type": "llama",
        "hidden_size": ckpt.hidden_size,
        "intermediate_size": int(c["intermediate_size"]),
        "num_hidden_layers": ckpt.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(c.get("num_key_value_heads") or heads),
        "max_position_embeddings": int(c.get("max_position_embeddings", 2048)),
        "rms_norm_eps": float(c.get("rms_norm_eps", 1e-6)),  # GeoChat's saves 1e-5
        "rope_theta": float(c.get("rope_theta", 10000.0)),
        "hidden_act": c.get("hidden_act", "silu"),
        "vocab_size": vocab.size,
        "bos_token_id": int(c.get("bos_token_id", 1)),
        "eos_token_id": int(c.get("eos_token_id", 2)),
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "attention_bias": False,
    }


def _vision_config(ckpt: GeoChatCheckpoint) -> dict:
    v = ckpt.clip.vision
    return {
        "model_type": "clip_vision_model",
        "hidden_size": int(v["hidden_size"]),
        "intermediate_size": int(v["intermediate_size"]),
        "num_hidden_layers": int(v["num_hidden_layers"]),
        "num_attention_heads": int(v["num_attention_heads"]),
        "patch_size": int(v["patch_size"]),
        "image_size": GEOCHAT_IMAGE_SIZE,
        "hidden_act": v.get("hidden_act", "quick_gelu"),
        "layer_norm_eps": float(v.get("layer_norm_eps", 1e-5)),
        "projection_dim": int(v.get("projection_dim", 768)),
        "num_channels": 3,
    }


def llava_config(ckpt: GeoChatCheckpoint, vocab: Vocabulary, dtype: str) -> dict:
    """``config.json`` of the converted model."""
    side = GEOCHAT_IMAGE_SIZE // int(ckpt.clip.vision["patch_size"])
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": _text_config(ckpt, vocab),
        "vision_config": _vision_config(ckpt),
        "image_token_index": vocab.image_token_id,
        "image_token_id": vocab.image_token_id,
        "image_seq_length": side * side,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": int(ckpt.config.get("mm_vision_select_layer", -2)),
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "torch_dtype": dtype,
    }


def _write_weights(folder: Path, plan: list[PlannedTensor], progress: Optional[Progress]) -> None:
    groups: list[list[PlannedTensor]] = []
    for item in plan:
        if not groups or groups[-1][0].source != item.source:
            groups.append([])
        groups[-1].append(item)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    shard_of = {item.name: names[g] for g, group in enumerate(groups) for item in group}
    writers: dict[str, SafetensorsStreamWriter] = {}
    done = 0
    for item, tensor in stream_tensors(plan):
        shard = shard_of[item.name]
        if shard not in writers:
            group = groups[names.index(shard)]
            writers[shard] = SafetensorsStreamWriter(folder / shard, [(i.name, i.shape, i.dtype) for i in group])
        writers[shard].write(item.name, tensor)
        del tensor
        done += 1
        if progress:
            progress(done, len(plan), item.name)
    for writer in writers.values():
        writer.close()
    total = sum((folder / name).stat().st_size for name in names)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(shard_of.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _write_processor(folder: Path, vocab: Vocabulary, patch_size: int) -> None:
    from transformers import LlamaTokenizer, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(vocab.sp_model, Path(tmp) / TOKENIZER_MODEL)
        settings = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
                    "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "pad_token": "<unk>", "clean_up_tokenization_spaces": False,
                    "model_max_length": 2048}
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
    tokenizer.add_tokens(vocab.added, special_tokens=True)
    if len(tokenizer) != vocab.size or tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != vocab.image_token_id:
        raise AssertionError("tokenizer vocabulary does not match the planned vocabulary")
    image_processor = LlavaImageProcessorPil(
        do_pad=True, do_resize=True, size={"shortest_edge": GEOCHAT_IMAGE_SIZE},
        do_center_crop=True, crop_size={"height": GEOCHAT_IMAGE_SIZE, "width": GEOCHAT_IMAGE_SIZE},
        resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN, chat_template=HF_CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    # transformers 4 and vLLM read the image processor from preprocessor_config.json
    nested = json.loads((folder / "processor_config.json").read_text(encoding="utf-8"))["image_processor"]
    legacy = {**nested, "processor_class": "LlavaProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(legacy, indent=2), encoding="utf-8")
    # transformers drops ``legacy`` when saving; without it the "▁" after <image> disappears.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["legacy"] = True
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    shutil.copy(vocab.sp_model, folder / TOKENIZER_MODEL)


def convert_geochat_to_hf(src: Path, out: Path, clip: Optional[Path] = None,
                          dtype: Optional[str] = None, progress: Optional[Progress] = None) -> Path:
    """Convert the GeoChat checkpoint in ``src`` into a LLaVA folder ``out``; returns ``out``.

    ``clip``: the CLIP-336 folder (default ``src/clip``). ``dtype``: output float type (default:
    the checkpoint's). The checkpoint is validated fully first; ``out`` appears only when
    everything has been written.
    """
    check_output_dir(out)
    ckpt = open_geochat_checkpoint(Path(src), clip)
    vocab = geochat_vocabulary(Path(src), ckpt.added_tokens())
    dtype = dtype or ckpt.dtype
    plan = plan_tensors(ckpt, vocab.size, dtype)
    with staged_output_dir(Path(out)) as stage:
        _write_weights(stage, plan, progress)
        config = llava_config(ckpt, vocab, dtype)
        (stage / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}
        (stage / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
        _write_processor(stage, vocab, int(ckpt.clip.vision["patch_size"]))
    return Path(out)
