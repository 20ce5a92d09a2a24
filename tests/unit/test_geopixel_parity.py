"""The project's GeoPixel against GeoPixel's own ``evaluate`` on the same tiny checkpoint.

The reference arrays (tests/data/geopixel/ref_*.npz, README.md there) were made by
bench/geopixel_reference.py running GeoPixel's code on a tiny checkpoint from the project's maker;
each file's meta records the checkpoint's sha256 per file, and the test rebuilds it with the maker
(byte-identical per seed). Free greedy runs are answered with GeoPixelModel.answer; teacher-forced
runs (a reply forced on a random model so its [SEG] masks run) go through the same parts with the
forced tokens fed at once. Targets in float32: greedy tokens identical, logits and mask logits
within 1e-3, binary masks identical (a pixel may differ only where both logits are within 1e-4
of zero). bfloat16 runs: tokens identical; how close the numbers get is printed (-s) and bounded
loosely.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from geochat_qgis.core.models.geopixel.modeling import GeoPixelModel  # noqa: E402
from geochat_qgis.core.models.geopixel.prompt import assemble_prompt, build_prompt_ids  # noqa: E402
from geochat_qgis.core.models.geopixel.tiny import write_tiny_geopixel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "geopixel"
REFERENCES = sorted(DATA.glob("ref_*.npz"))
MAKER_OPTIONS = [{"seed": 0, "seg_answer": s} for s in (False, "twice", "once")]
_spec = importlib.util.spec_from_file_location("geopixel_vision_reference",
                                               ROOT / "bench" / "geopixel_vision_reference.py")
tiles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiles)
pytestmark = pytest.mark.skipif(not REFERENCES, reason="no reference arrays in tests/data/geopixel (ref_*.npz)")


def _runs(path: Path) -> list[tuple[str, dict]]:
    with np.load(path) as npz:
        meta = json.loads(str(npz["meta"]))
    return [(path.name, run) for run in meta if "run" in run]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The sha256 of the three shards -> the rebuilt checkpoint folder."""
    built = {}
    for options in MAKER_OPTIONS:
        folder = write_tiny_geopixel(tmp_path_factory.mktemp("parity") / "ckpt", **options)
        built[_shards_key({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()})] = folder
    return built


def _shards_key(files: dict[str, str]) -> tuple[str, ...]:
    return tuple(files[f"pytorch_model-0000{k}-of-00003.bin"] for k in (1, 2, 3))


_models: dict[tuple[Path, str], GeoPixelModel] = {}


def _model(name: str, checkpoints: dict[str, Path]) -> tuple[GeoPixelModel, np.lib.npyio.NpzFile, dict]:
    npz = np.load(DATA / name)
    meta = json.loads(str(npz["meta"]))
    files = next(m for m in meta if "checkpoint_sha256" in m)["checkpoint_sha256"]
    folder = checkpoints.get(_shards_key(files))
    assert folder is not None, f"{name} comes from a checkpoint none of {MAKER_OPTIONS} rebuilds"
    for file, digest in files.items():
        assert hashlib.sha256((folder / file).read_bytes()).hexdigest() == digest, file
    dtype = next(m["dtype"] for m in meta if "dtype" in m)
    if (folder, dtype) not in _models:
        _models[folder, dtype] = GeoPixelModel.from_folder(folder, dtype=dtype)
    return _models[folder, dtype], npz, meta


def _forced(model: GeoPixelModel, tile: np.ndarray, query: str, forced: list[int]):
    """Logits, [SEG] states and masks with the reply ``forced`` fed (what GeoPixel's forced run sees)."""
    with torch.no_grad():
        embeds = model.vision.embed(tile)
        pieces = build_prompt_ids(model.tokenizer, query)
        prompt, im_mask = assemble_prompt(model.decoder.embed, pieces, embeds.to(model.dtype))
        n_prompt = prompt.shape[1]
        fed = torch.tensor([forced[:-1]], dtype=torch.long)
        x = torch.cat([prompt, model.decoder.embed(fed)], dim=1)
        mask = torch.cat([im_mask, im_mask.new_zeros(1, fed.shape[1])], dim=1)
        hidden = model.decoder(x, mask, None, None)[0]
        logits = model.decoder.logits(hidden[n_prompt - 1:]).float().numpy()
        rows = [n_prompt + j for j, t in enumerate(forced[:-1]) if t == model.seg_id]
        seg = hidden[rows]
        masks = model.sam2.decode(model.sam2.encode_tiles([tile]), 0, seg)[2] if rows else None
    return n_prompt, logits, seg.float().numpy(), None if masks is None else masks.float().numpy()


def _strided(npz, key: str, ours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stride = int(npz[key + "__stride"]) if key + "__stride" in npz.files else 1
    ref = npz[key]
    index = tuple(slice(None, None, stride) if i >= ours.ndim - 2 else slice(None) for i in range(ours.ndim))
    return ours[index], ref


def _check_masks(npz, prefix: str, ours: np.ndarray) -> None:
    shape = tuple(int(v) for v in npz[prefix + "final_shape"])
    assert ours.shape == shape
    mine, ref = _strided(npz, prefix + "final_logits", ours)
    assert np.abs(mine - ref).max() <= 1e-3
    bits = np.unpackbits(npz[prefix + "final_bits"], axis=-1)[..., :shape[-1]].astype(bool)
    flipped = (ours > 0) != bits
    assert np.all(np.abs(ours[flipped]) < 1e-4), f"{int(flipped.sum())} pixels differ in sign"


@pytest.mark.parametrize("name,run", [r for path in REFERENCES for r in _runs(path)],
                         ids=lambda v: v if isinstance(v, str) else f"{v['image']}-{v['run']}")
def test_geopixel_parity(name: str, run: dict, checkpoints) -> None:
    model, npz, _meta = _model(name, checkpoints)
    prefix = f"{run['index']}.{run['run']}."
    tile = tiles.pattern_tile(*tiles.TILES[Path(run["image"]).stem])
    f32 = run["dtype"] == "float32"
    if run["force"] is None:
        answer = model.answer(tile, run["query"], max_new_tokens=run["max_new_tokens"], want_logits=True)
        assert answer.token_ids == npz[prefix + "output_ids"].tolist()
        assert answer.text == run["reply"]
        n_prompt, logits, seg, masks = answer.prompt_tokens, answer.step_logits, answer.seg_hidden, answer.mask_logits
    else:
        n_prompt, logits, seg, masks = _forced(model, tile, run["query"], run["forced_ids"])
    assert n_prompt == int(npz[prefix + "n_prompt"])
    ref_logits = npz[prefix + "step_logits"]
    diff = np.abs(logits - ref_logits).max()
    print(f"{name} {run['image']} {run['run']} {run['dtype']}: logits max |d| {diff:.2e}", end="")
    assert diff <= (1e-3 if f32 else 0.05 * np.abs(ref_logits).max())
    if prefix + "seg_hidden" in npz.files:
        seg_diff = np.abs(seg - npz[prefix + "seg_hidden"]).max()
        assert seg_diff <= (1e-3 if f32 else 0.05 * np.abs(npz[prefix + "seg_hidden"]).max())
        mine, ref = _strided(npz, prefix + "final_logits", masks)
        same = (masks > 0) == np.unpackbits(npz[prefix + "final_bits"], axis=-1)[..., :masks.shape[-1]]
        agree = same.mean()
        print(f", mask logits max |d| {np.abs(mine - ref).max():.2e}, {int((~same).sum())} of {same.size} "
              "pixels differ in sign", end="")
        if f32:
            _check_masks(npz, prefix, masks)
        else:
            assert agree > 0.95
    print()
