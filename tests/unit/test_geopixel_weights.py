"""GeoPixel's weights: one routing table, the dead adapters never read, clear refusals, and the
conversion to safetensors (once, without them, atomic, resumable)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from geochat_qgis.core.cancel import CancelToken  # noqa: E402
from geochat_qgis.core.errors import Cancelled, ModelError  # noqa: E402
from geochat_qgis.core.models.geopixel import weights  # noqa: E402
from geochat_qgis.core.models.geopixel.decoder import InternLM2Decoder  # noqa: E402
from geochat_qgis.core.models.geopixel.modeling import GeoPixelModel, read_checkpoint  # noqa: E402
from geochat_qgis.core.models.geopixel.sam2 import GeoPixelSam2  # noqa: E402
from geochat_qgis.core.models.geopixel.vision import IXCVision  # noqa: E402
from geochat_qgis.core.weights.checkpoint_io import shard_metadata  # noqa: E402
from geopixel_fixtures import tiny_geopixel  # noqa: E402,F401 (fixture)

REPO = Path(__file__).resolve().parents[2]
SHARD3 = "pytorch_model-00003-of-00003.bin"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder: Path, shard: str, change) -> None:
    """Change one shard's dict and keep the index in step."""
    state = dict(torch.load(folder / shard, weights_only=True))
    change(state)
    torch.save(state, folder / shard)
    index_path = folder / weights.BIN_INDEX
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update(dict.fromkeys(state, shard))
    index_path.write_text(json.dumps(index))


def _model_state(model: GeoPixelModel) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part in ("decoder", "vision", "sam2")
            for k, v in getattr(model, part).state_dict().items()}


def test_every_name_has_one_route() -> None:
    assert weights.route("model.layers.3.feed_forward.w2.weight") == "text"
    assert weights.route("output.weight") == "text"
    assert weights.route("vit.vision_tower.vision_model.post_layernorm.bias") == "vision"
    assert weights.route("plora_sub_GN") == "vision"
    assert weights.route("model.visual_model.sam_mask_decoder.iou_token.weight") == "sam2"
    assert weights.route("model.text_hidden_fcs.0.2.weight") == "sam2"
    for skipped in ("model.layers.0.attention.wqkv.lora_sft_A.weight",
                    "model.layers.31.feed_forward.w2.lora_web_B.weight",
                    "model.layers.9.attention.wo.lora_dpo_A.weight",
                    "model.visual_model.memory_attention.layers.0.linear1.weight",
                    "model.visual_model.maskmem_tpos_enc",
                    "vit.vision_tower.vision_model.embeddings.position_ids"):
        assert weights.route(skipped) is None
    with pytest.raises(ModelError, match="'model.lm_head.weight' belongs to no part of GeoPixel"):
        weights.route("model.lm_head.weight")


def test_the_loader_reads_every_used_tensor_once_and_no_skipped_one(tiny_geopixel: Path) -> None:
    checkpoint = read_checkpoint(tiny_geopixel)
    used = {n for n in checkpoint.shapes if not weights.is_skipped(n)}
    config = checkpoint.config
    with torch.device("meta"):
        parts = {"text": InternLM2Decoder(config.text), "vision": IXCVision(config.vision),
                 "sam2": GeoPixelSam2(config.sam2)}
    seen: list[str] = []
    report = weights.load_parts(checkpoint.files, parts, dtype=torch.float32, on_read=seen.append)
    assert sorted(seen) == sorted(report.read) == sorted(used)
    assert report.skipped == len(checkpoint.shapes) - len(used) == 60 + 157
    assert report.bytes_read == sum(torch.Size(checkpoint.shapes[n]).numel() * 4 for n in used)
    assert not any(p.is_meta for part in parts.values() for p in part.parameters())


def _peak_rss_mb(folder: Path) -> float:
    """Peak resident memory of a fresh Python that loads ``folder`` (MiB)."""
    code = textwrap.dedent(f"""
        import resource, sys
        from geochat_qgis.core.models.geopixel.modeling import GeoPixelModel
        GeoPixelModel.from_folder({str(folder)!r}, dtype="float32")
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.split()[-1])


def test_dead_adapters_stay_on_disk(tiny_geopixel: Path, tmp_path: Path) -> None:
    """A checkpoint whose lora_web adapter holds 384 MB loads in the memory of one without it:
    the loader maps the shards and never touches the dead adapters' bytes."""
    big = _copy(tiny_geopixel, tmp_path / "big")
    name = "model.layers.1.feed_forward.w2.lora_web_A.weight"
    _rewrite(big, weights_shard_of(big, name), lambda s: s.update({name: torch.ones(96, 1024, 1024)}))
    baseline, heavy = _peak_rss_mb(tiny_geopixel), _peak_rss_mb(big)
    assert heavy - baseline < 64, (baseline, heavy)


def test_a_missing_tensor_is_named(tiny_geopixel: Path, tmp_path: Path) -> None:
    broken = _copy(tiny_geopixel, tmp_path / "broken")
    name = "model.layers.1.feed_forward.w2.weight"
    _rewrite(broken, weights_shard_of(broken, name), lambda s: s.pop(name))
    with pytest.raises(ModelError, match=rf"lacks .*{name.replace('.', '[.]')}.*download it again"):
        GeoPixelModel.from_folder(broken, dtype="float32")


def weights_shard_of(folder: Path, name: str) -> str:
    return json.loads((folder / weights.BIN_INDEX).read_text())["weight_map"][name]


def test_unknown_tensors_missing_shards_and_other_models_are_refused(tiny_geopixel: Path, tmp_path: Path) -> None:
    odd = _copy(tiny_geopixel, tmp_path / "odd")
    _rewrite(odd, SHARD3, lambda s: s.update({"model.extra_head.weight": torch.zeros(2, 2)}))
    with pytest.raises(ModelError, match="'model.extra_head.weight' belongs to no part"):
        GeoPixelModel.from_folder(odd, dtype="float32")
    gone = _copy(tiny_geopixel, tmp_path / "gone")
    (gone / SHARD3).unlink()
    with pytest.raises(ModelError, match=f"{SHARD3} named in pytorch_model.bin.index.json is missing"):
        read_checkpoint(gone)
    ixc = _copy(tiny_geopixel, tmp_path / "ixc")
    for shard in set(json.loads((ixc / weights.BIN_INDEX).read_text())["weight_map"].values()):
        _rewrite(ixc, shard, lambda s: [s.pop(k) for k in list(s) if k.startswith("model.visual_model.")])
    with pytest.raises(ModelError, match="no SAM-2 mask head .*not GeoPixel"):
        read_checkpoint(ixc)
    with pytest.raises(ModelError, match="No GeoPixel weights in .*pytorch_model.bin.index.json"):
        read_checkpoint(tmp_path)


def test_conversion_drops_the_dead_tensors_and_loads_the_same_model(tiny_geopixel: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    steps: list[tuple[int, int]] = []
    assert weights.convert_to_safetensors(tiny_geopixel, out, progress=lambda d, t: steps.append((d, t))) == out
    shards = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert {p.name for p in out.iterdir()} == {
        *shards, weights.SAFETENSORS_INDEX, "config.json", "generation_config.json", "tokenizer.model",
        "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"}
    stored = {n: m for s in shards for n, m in shard_metadata(out / s).items()}
    original = read_checkpoint(tiny_geopixel).shapes
    assert set(stored) == {n for n in original if not weights.is_skipped(n)}
    assert steps[-1][0] == steps[-1][1] == sum(torch.Size(m.shape).numel() * 4 for m in stored.values())
    assert all(a <= b for (a, _), (b, _) in zip(steps, steps[1:]))
    assert weights.checkpoint_files(out) == [out / s for s in shards]  # preferred over any .bin
    a = _model_state(GeoPixelModel.from_folder(tiny_geopixel, dtype="float32"))
    b = _model_state(GeoPixelModel.from_folder(out, dtype="float32"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    half = weights.convert_to_safetensors(tiny_geopixel, tmp_path / "bf16", dtype="bfloat16")
    assert {m.dtype for m in shard_metadata(half / shards[0]).values()} == {"bfloat16"}
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_an_interrupted_conversion_resumes_at_its_first_unfinished_shard(tiny_geopixel: Path,
                                                                         tmp_path: Path) -> None:
    out = tmp_path / "converted"
    cancel = CancelToken()
    first = sum(torch.Size(m.shape).numel() * 4 for n, m in shard_metadata_bin(tiny_geopixel, 1).items()
                if not weights.is_skipped(n))

    def stop_in_second_shard(done: int, total: int) -> None:
        if done > first:
            cancel.cancel()

    with pytest.raises(Cancelled):
        weights.convert_to_safetensors(tiny_geopixel, out, progress=stop_in_second_shard, cancel=cancel)
    names = {p.name for p in out.iterdir()}
    assert names == {"model-00001-of-00003.safetensors"}  # no partial file, no index: not complete
    with pytest.raises(ModelError, match="incomplete|No GeoPixel weights"):
        read_checkpoint(out)
    done_first = (out / "model-00001-of-00003.safetensors").stat()
    steps: list[tuple[int, int]] = []
    weights.convert_to_safetensors(tiny_geopixel, out, progress=lambda d, t: steps.append((d, t)))
    assert (out / "model-00001-of-00003.safetensors").stat().st_mtime_ns == done_first.st_mtime_ns
    assert steps[0][0] > first  # counted as done, not written again
    fresh = weights.convert_to_safetensors(tiny_geopixel, tmp_path / "fresh")
    for path in fresh.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="holds other files \\(notes.txt\\)"):
        weights.convert_to_safetensors(tiny_geopixel, tmp_path / "other")


def shard_metadata_bin(folder: Path, number: int):
    return shard_metadata(folder / f"pytorch_model-0000{number}-of-00003.bin")
