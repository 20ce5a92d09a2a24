"""make-tiny-model: a GeoChat-layout checkpoint built offline in seconds, and its conversions."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from geochat_qgis.cli import main
from geochat_qgis.core.errors import ModelError
from geochat_qgis.core.weights.checkpoint_io import open_tensors
from geochat_qgis.core.weights.tiny import build_tiny_geochat
from test_weights_helpers import ckpt, original_arrays  # noqa: F401 (fixture)


def test_checkpoint_is_laid_out_as_geochat_saves_it(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "geochat"
    assert config["architectures"] == ["GeoChatLlamaForCausalLM"]
    assert config["mm_vision_tower"] == "openai/clip-vit-large-patch14-336"
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
    assert "mm_use_im_patch_token" in config and "mm_use_im_start_end" in config
    index = json.loads((ckpt / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    state = original_arrays(ckpt, with_clip=False)
    assert set(index["weight_map"]) == set(state)
    assert state["model.mm_projector.0.weight"].shape == (64, 32)
    assert state["model.mm_projector.2.weight"].shape == (64, 64)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in state
    stale = "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight"
    assert state[stale].shape == (36 * 36 + 1, 32)  # the 36x36+1 table GeoChat runs with


def test_clip_folder_is_a_clip_336_style_tower(ckpt: Path) -> None:
    config = json.loads((ckpt / "clip" / "config.json").read_text())
    vision = config["vision_config"]
    assert (vision["image_size"], vision["patch_size"], vision["hidden_act"]) == (336, 14, "quick_gelu")
    with open_tensors(ckpt / "clip" / "model.safetensors") as tensors:
        table = tensors["vision_model.embeddings.position_embedding.weight"]
        assert table.shape == (24 * 24 + 1, 32) and table.dtype == "float32"
        assert any(key.startswith("visual_projection") for key in tensors)


def test_tokenizer_is_llama_style_sentencepiece(ckpt: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    assert sp.get_piece_size() == 512
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.encode("\n", out_type=str)[-1] == "<0x0A>"  # byte fallback, as in Llama
    assert sp.encode("12", out_type=str)[-2:] == ["1", "2"]  # split digits
    assert sp.decode(sp.encode("<p>car</p> {<1><2><3><4>|<5>}")) == "<p>car</p> {<1><2><3><4>|<5>}"


def test_same_seed_same_model_other_seed_other_weights(ckpt: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    again = build_tiny_geochat(tmp_path / "again", "geochat-checkpoint", seed=0)
    assert time.monotonic() - start < 30
    other = build_tiny_geochat(tmp_path / "other", "geochat-checkpoint", seed=1)
    assert (again / "tokenizer.model").read_bytes() == (ckpt / "tokenizer.model").read_bytes()
    first, second, third = (original_arrays(path, with_clip=False) for path in (ckpt, again, other))
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert not np.array_equal(first["lm_head.weight"], third["lm_head.weight"])
    for name in ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "clip/model.safetensors"):
        assert (again / name).read_bytes() == (ckpt / name).read_bytes()  # byte for byte
    size = sum(p.stat().st_size for p in again.rglob("*") if p.is_file())
    assert size < 2 * 2**20


@pytest.mark.parametrize("fmt, files", [
    ("gguf", ["mmproj.gguf", "model.gguf"]),
    ("hf", ["config.json", "model.safetensors.index.json", "processor_config.json", "tokenizer.model"]),
])
def test_cli_builds_each_format(tmp_path: Path, fmt: str, files: list[str], capsys) -> None:
    out = tmp_path / fmt
    assert main(["make-tiny-model", "--family", "geochat", "--format", fmt, str(out)]) == 0
    assert set(files) <= {p.name for p in out.iterdir()}
    assert str(out) in capsys.readouterr().out


def test_cli_rejects_quant_outside_gguf(tmp_path: Path, capsys) -> None:
    assert main(["make-tiny-model", "--format", "hf", "--quant", "q8_0", str(tmp_path / "x")]) == 1
    assert "--quant" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="Unknown tiny model format"):
        build_tiny_geochat(tmp_path / "x", "onnx")


def test_head_dim_32_for_vllms_cpu_build(tmp_path: Path, capsys) -> None:
    """Issue 23: vLLM's CPU attention refuses heads narrower than 32; --head-dim 32 keeps the
    width (two heads) and runs on llama.cpp as well."""
    from geochat_qgis.core.backends.base import Conversation, GenerateOptions
    from geochat_qgis.core.backends.llama_cpp import LlamaCppBackend

    out = tmp_path / "hf32"
    assert main(["make-tiny-model", "--format", "hf", "--head-dim", "32", str(out)]) == 0
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]) == (64, 2, 2)
    wide = build_tiny_geochat(tmp_path / "ckpt128", "geochat-checkpoint", head_dim=128)
    config = json.loads((wide / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 128
    gguf = build_tiny_geochat(tmp_path / "gguf32", "gguf", head_dim=32)
    tile = np.random.default_rng(0).integers(0, 256, (504, 504, 3), dtype=np.uint8)
    with LlamaCppBackend(gguf) as backend:
        (answer,) = backend.generate([tile], Conversation.single("car?"),
                                     GenerateOptions(max_new_tokens=4))
    assert answer.generated_tokens >= 1


@pytest.mark.parametrize("head_dim", [0, 12, 48, 33])
def test_a_head_dim_that_does_not_fit_is_refused_before_writing(tmp_path: Path, head_dim) -> None:
    with pytest.raises(ModelError, match=f"head_dim {head_dim} does not fit"):
        build_tiny_geochat(tmp_path / "x", "hf", head_dim=head_dim)
    assert not (tmp_path / "x").exists()
