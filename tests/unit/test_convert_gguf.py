"""GeoChat checkpoint -> llama.cpp GGUF pair (text model + mmproj): contents checked with the
gguf reader against the original tensors, then loaded and run by llama-cpp-python."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geochat_qgis.cli import main
from geochat_qgis.core.weights.gguf_writer import MMPROJ_GGUF, TEXT_GGUF
from test_weights_helpers import ckpt, keys_bicubic_table, original_arrays  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def gguf_dir(ckpt: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "gguf"
    assert main(["convert", "geochat", str(ckpt), str(out), "--to", "gguf"]) == 0
    return out


def _tensors(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: np.array(t.data) for t in reader.tensors}


def _field(reader, key: str):
    field = reader.fields[key]
    values = [field.parts[i] for i in field.data]
    if field.types[-1] == gguf.GGUFValueType.STRING:
        strings = [bytes(v).decode() for v in values]
        return strings if field.types[0] == gguf.GGUFValueType.ARRAY else strings[0]
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [v.tolist()[0] for v in values]
    return values[0].tolist()[0]


def _data_url(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (504, 504, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_folder_holds_text_model_and_mmproj(gguf_dir: Path) -> None:
    assert sorted(p.name for p in gguf_dir.iterdir()) == sorted([TEXT_GGUF, MMPROJ_GGUF])


def test_mmproj_metadata_matches_geochat(gguf_dir: Path) -> None:
    reader = gguf.GGUFReader(str(gguf_dir / MMPROJ_GGUF))
    assert _field(reader, "general.architecture") == "clip"
    assert _field(reader, "clip.projector_type") == "mlp"
    assert _field(reader, "clip.vision.image_size") == 504
    assert _field(reader, "clip.vision.patch_size") == 14
    assert _field(reader, "clip.vision.block_count") == 2  # 3 CLIP layers, the last dropped
    assert _field(reader, "clip.vision.feature_layer") == [2]
    assert _field(reader, "clip.use_gelu") is False  # quick_gelu
    assert _field(reader, "clip.vision.projection_dim") == 64
    np.testing.assert_allclose(_field(reader, "clip.vision.image_mean"), [0.48145466, 0.4578275, 0.40821073])
    names = {t.name for t in reader.tensors}
    assert not any(n.startswith("v.blk.2.") for n in names), "last CLIP layer dropped"
    assert not any("post_ln" in n for n in names), "LLaVA reads features before post-layernorm"
    assert {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", "v.class_embd"} <= names


def test_mmproj_holds_the_interpolated_table_and_the_projector(gguf_dir: Path, ckpt: Path) -> None:
    tensors = _tensors(gguf_dir / MMPROJ_GGUF)
    original = original_arrays(ckpt)
    table = original["clip.vision_model.embeddings.position_embedding.weight"]
    assert tensors["v.position_embd.weight"].shape == (1297, 32)
    np.testing.assert_array_equal(tensors["v.position_embd.weight"], keys_bicubic_table(table, 36))
    np.testing.assert_array_equal(tensors["mm.0.weight"], original["model.mm_projector.0.weight"])
    np.testing.assert_array_equal(tensors["mm.2.bias"], original["model.mm_projector.2.bias"])
    np.testing.assert_array_equal(tensors["v.blk.1.ffn_up.weight"],
                                  original["clip.vision_model.encoder.layers.1.mlp.fc1.weight"])


def test_text_model_metadata_vocabulary_and_rope_layout(gguf_dir: Path, ckpt: Path) -> None:
    reader = gguf.GGUFReader(str(gguf_dir / TEXT_GGUF))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert _field(reader, "llama.vocab_size") == 514
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 514 and tokens[-2:] == ["<im_patch>", "<image>"]
    tensors = {t.name: t for t in reader.tensors}
    assert "blk.0.attn_q.weight" in tensors and "output.weight" in tensors
    original = original_arrays(ckpt)
    q = np.array(tensors["blk.1.attn_q.weight"].data)
    heads, rows = 4, 64
    # undo llama.cpp's interleaved rope layout: it must give back the HF weight exactly
    unpermuted = q.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(q.shape)
    np.testing.assert_array_equal(unpermuted, original["model.layers.1.self_attn.q_proj.weight"])
    assert not any(".rotary_emb." in name for name in tensors)


def test_llama_cpp_runs_the_pair_with_1296_image_tokens(gguf_dir: Path) -> None:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    handler = Llava15ChatHandler(clip_model_path=str(gguf_dir / MMPROJ_GGUF), verbose=False)
    llm = Llama(model_path=str(gguf_dir / TEXT_GGUF), chat_handler=handler, n_ctx=2048,
                n_threads=2, verbose=False)
    try:
        content = [{"type": "image_url", "image_url": {"url": _data_url(0)}}, {"type": "text", "text": "hi"}]
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": content}],
                                           max_tokens=4, temperature=0)
        with_image = reply["usage"]["prompt_tokens"]
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, temperature=0)
        assert with_image - reply["usage"]["prompt_tokens"] == 1296
    finally:
        llm.close()


@pytest.mark.parametrize("quant, file_type", [("q8_0", 7), ("q4_k_m", 15)])
def test_quantised_text_model_loads_and_generates(ckpt: Path, tmp_path: Path, quant: str, file_type: int) -> None:
    from llama_cpp import Llama

    out = tmp_path / quant
    assert main(["convert", "geochat", str(ckpt), str(out), "--to", "gguf", "--quant", quant]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([TEXT_GGUF, MMPROJ_GGUF])
    reader = gguf.GGUFReader(str(out / TEXT_GGUF))
    assert _field(reader, "general.file_type") == file_type
    llm = Llama(model_path=str(out / TEXT_GGUF), n_ctx=256, n_threads=2, verbose=False)
    try:
        text = llm.create_completion("USER: hello ASSISTANT:", max_tokens=5, temperature=0)
        assert text["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()


def test_quantising_a_corrupt_gguf_fails_cleanly(tmp_path: Path) -> None:
    from geochat_qgis.core.errors import ModelError
    from geochat_qgis.core.weights.quantize import quantize_gguf

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ModelError, match=r"could not quantise bad\.gguf to q8_0 \(status 1"):
        quantize_gguf(bad, tmp_path / "out.gguf", "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]
