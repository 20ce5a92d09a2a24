"""make-tiny-model --family geopixel: a random GeoPixel in the published checkpoint's exact layout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from geochat_qgis.cli import main  # noqa: E402
from geochat_qgis.core.errors import ModelError  # noqa: E402
from geochat_qgis.core.models.geopixel import decoder, layout, sam2, vision, weights  # noqa: E402
from geochat_qgis.core.models.geopixel.sam2_unused import is_unused  # noqa: E402
from geochat_qgis.core.models.geopixel.tiny import preset_configs, write_tiny_geopixel  # noqa: E402
from geopixel_fixtures import tiny_geopixel  # noqa: E402,F401 (fixture)

SHARDS = [f"pytorch_model-0000{k}-of-00003.bin" for k in (1, 2, 3)]
TOKENIZER_FILES = {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"}
# GeoPixel-7B's config.json keys (IXC-2.5's, as transformers 4.33 saves them, plus GeoPixel's)
CONFIG_KEYS = {
    "_name_or_path", "architectures", "attn_implementation", "auto_map", "bias", "bos_token_id",
    "eos_token_id", "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "max_length",
    "max_position_embeddings", "model_type", "num_attention_heads", "num_hidden_layers",
    "num_key_value_heads", "out_dim", "pad_token_id", "rms_norm_eps", "rope_scaling", "rope_theta",
    "tie_word_embeddings", "torch_dtype", "train_mask_decoder", "transformers_version", "use_cache",
    "vocab_size"}


def _shard_tensors(folder: Path) -> dict[str, dict]:
    return {name: torch.load(folder / name, weights_only=True, mmap=True) for name in SHARDS}


def test_the_files_are_the_published_layout(tiny_geopixel: Path) -> None:
    names = {p.name for p in tiny_geopixel.iterdir()}
    assert names == {"config.json", "generation_config.json", "pytorch_model.bin.index.json",
                     *SHARDS, *TOKENIZER_FILES}
    config = json.loads((tiny_geopixel / "config.json").read_text())
    assert set(config) == CONFIG_KEYS
    assert config["architectures"] == ["GeoPixelForCausalLM"] and config["model_type"] == "internlm2"
    assert config["rope_scaling"] == {"factor": 2.0, "type": "dynamic"} and config["rope_theta"] == 1000000
    added = json.loads((tiny_geopixel / "added_tokens.json").read_text())
    assert sorted(added, key=added.get) == ["[SEG]", "<p>", "</p>"]
    assert config["vocab_size"] == max(added.values()) + 1


def test_the_index_lists_every_tensor_in_its_shard(tiny_geopixel: Path) -> None:
    index = json.loads((tiny_geopixel / "pytorch_model.bin.index.json").read_text())
    shards = _shard_tensors(tiny_geopixel)
    assert set(index["weight_map"].values()) == set(SHARDS)
    for name, shard in index["weight_map"].items():
        assert name in shards[shard]
    assert sum(len(s) for s in shards.values()) == len(index["weight_map"]) == 578
    nbytes = sum(t.numel() * t.element_size() for s in shards.values() for t in s.values())
    assert index["metadata"]["total_size"] == nbytes
    assert all(t.dtype == torch.float32 for s in shards.values() for t in s.values())


def test_every_tensor_geopixel_holds_is_there(tiny_geopixel: Path) -> None:
    """The parts' own tensors plus what the loader skips: the dead adapters in every Partial-LoRA
    linear and SAM-2's video parts; nothing else, shapes as the parts build them."""
    shapes = {n: tuple(t.shape) for s in _shard_tensors(tiny_geopixel).values() for n, t in s.items()}
    text, vis, sam = preset_configs("tiny", shapes["model.tok_embeddings.weight"][0])
    assert shapes == layout.checkpoint_layout(text, vis, sam)
    with torch.device("meta"):
        parts = {decoder.checkpoint_param_name(n): tuple(p.shape)
                 for n, p in decoder.InternLM2Decoder(text).named_parameters()}
        parts.update({n: tuple(t.shape) for n, t in vision.IXCVision(vis).state_dict().items()})
    parts.update(sam2.expected_shapes(sam))
    skipped = {n: s for n, s in shapes.items() if weights.is_skipped(n)}
    assert {n: s for n, s in shapes.items() if n not in skipped} == parts
    dead = [n for n in skipped if ".lora_" in n]
    assert len(dead) == 2 * 3 * 5 * 2  # A and B of sft/dpo/web in wqkv, wo, w1, w2, w3 of 2 layers
    assert all(is_unused(n) for n in skipped if n not in dead)
    assert shapes["model.layers.0.attention.wqkv.lora_web_A.weight"] == (512, 64)


def test_same_seed_same_bytes_other_seed_other_weights(tiny_geopixel: Path, tmp_path: Path) -> None:
    again = write_tiny_geopixel(tmp_path / "again", seed=0)
    for path in tiny_geopixel.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = write_tiny_geopixel(tmp_path / "other", seed=1)
    a = torch.load(tiny_geopixel / SHARDS[2], weights_only=True)
    b = torch.load(other / SHARDS[2], weights_only=True)
    assert a.keys() == b.keys() and not any(torch.equal(a[k], b[k]) for k in a if a[k].numel() > 1)


def test_the_cli_writes_the_same_model(tiny_geopixel: Path, tmp_path: Path, capsys) -> None:
    assert main(["make-tiny-model", "--family", "geopixel", "--out", str(tmp_path / "m")]) == 0
    assert "tiny geopixel (tiny) written to" in capsys.readouterr().out
    for name in SHARDS:
        assert (tmp_path / "m" / name).read_bytes() == (tiny_geopixel / name).read_bytes()
    assert main(["make-tiny-model", "--family", "geopixel", "--out", str(tmp_path / "m")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["make-tiny-model", "--family", "geopixel", "--format", "gguf", str(tmp_path / "g")]) == 1
    assert "GeoPixel is written in its published layout" in capsys.readouterr().err


def test_real_width_preset_is_geopixel_7b_layout_with_fewer_layers() -> None:
    text, vis, sam = preset_configs("real-width", 0)
    full = layout.checkpoint_layout(text, vis, sam)
    assert len(full) == 2808 and full["model.tok_embeddings.weight"] == (92547, 4096)
    assert full["model.layers.0.attention.wqkv.weight"] == (6144, 4096)
    assert full["vit.vision_tower.vision_model.embeddings.position_embedding.weight"] == (1601, 1024)
    assert full["model.visual_model.image_encoder.trunk.blocks.47.attn.qkv.weight"] == (3456, 1152)
    text1, *_ = preset_configs("real-width", 0, layers=1)
    assert text1.num_hidden_layers == 1 and text1.vocab_size == 92547
    with pytest.raises(ModelError, match="--layers must be at least 1"):
        preset_configs("real-width", 0, layers=0)
    with pytest.raises(ModelError, match="Unknown GeoPixel preset 'huge'"):
        preset_configs("huge", 0)
