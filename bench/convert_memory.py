"""Benchmark: the GeoChat conversion with the numpy reader against the torch reader.

A random GeoChat-style checkpoint is written with numpy (torch_zip_writer, the format torch.save
writes) into a temporary folder: a Llama text model 2048 wide x 15 layers in three pickle
``.bin`` shards, one bfloat16, one float16 (with the saved vision tower copy, as GeoChat's second
shard holds it) and one float32, and a full-size CLIP-L/14-336 vision tower in float32 as
``clip/pytorch_model.bin`` (the real CLIP-336 repository ships a pickle). It is deleted at the
end unless ``--keep``.

Each conversion (``--to hf`` and ``--to gguf``, f16) runs in a fresh process, once with each
reader (``GEOCHAT_PICKLE_READER``; torch unimportable for the numpy runs, as in the llama.cpp
runtime): its seconds and peak RSS (``VmHWM``) against the largest
``.bin`` read (goal: numpy no slower than torch, peak within the largest shard + 1 GiB), and the
outputs of the two readers compared byte for byte. A last process reads every shard with both
``torch.load(weights_only=True, mmap=True)`` and the numpy reader and compares every tensor's
bytes.

    .venv/bin/python bench/convert_memory.py [--dir /tmp/geochat-convert-bench] [--keep]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geochat_qgis.core.weights.tensor_data import TensorData, f32_to_bf16  # noqa: E402
from geochat_qgis.core.weights.tiny import geochat_config, train_tokenizer  # noqa: E402
from geochat_qgis.core.weights.torch_zip_writer import save_state_dict  # noqa: E402

# vocabulary: the tiny builder's 512-piece tokenizer (a 32000-piece one cannot be trained offline)
TEXT = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 15,
        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 512}
VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
          "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
SHARD_DTYPES = ("bfloat16", "float16", "float32")
LAYERS_PER_SHARD = (7, 5, 3)


def _filled(shape: tuple[int, ...], dtype: str, seed: int) -> TensorData:
    """A tensor of random-looking values, cheap to make (a random block tiled)."""
    block = np.random.default_rng(seed).standard_normal(1 << 16, dtype=np.float32) * np.float32(0.02)
    count = math.prod(shape)
    values = np.resize(block, count).reshape(shape)
    if dtype == "bfloat16":
        return TensorData(f32_to_bf16(values), dtype)
    return TensorData(values.astype(dtype), dtype)


def _vision_shapes(prefix: str, grid: int) -> dict[str, tuple[int, ...]]:
    d, ff, p = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]
    shapes = {f"{prefix}embeddings.class_embedding": (d,),
              f"{prefix}embeddings.patch_embedding.weight": (d, 3, p, p),
              f"{prefix}embeddings.position_embedding.weight": (grid * grid + 1, d)}
    for norm in ("pre_layrnorm", "post_layernorm"):
        shapes.update({f"{prefix}{norm}.weight": (d,), f"{prefix}{norm}.bias": (d,)})
    for i in range(VISION["num_hidden_layers"]):
        layer = f"{prefix}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{layer}self_attn.{name}.weight": (d, d), f"{layer}self_attn.{name}.bias": (d,)})
        for name in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{layer}{name}.weight": (d,), f"{layer}{name}.bias": (d,)})
        shapes.update({f"{layer}mlp.fc1.weight": (ff, d), f"{layer}mlp.fc1.bias": (ff,),
                       f"{layer}mlp.fc2.weight": (d, ff), f"{layer}mlp.fc2.bias": (d,)})
    return shapes


def _text_shards() -> list[dict[str, tuple[int, ...]]]:
    h, ff = TEXT["hidden_size"], TEXT["intermediate_size"]
    shards: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (TEXT["vocab_size"], h)}, {}, {}]
    layer = 0
    for shard, count in zip(shards, LAYERS_PER_SHARD):
        for _ in range(count):
            prefix = f"model.layers.{layer}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shard[f"{prefix}self_attn.{name}.weight"] = (h, h)
            shard.update({f"{prefix}mlp.gate_proj.weight": (ff, h), f"{prefix}mlp.up_proj.weight": (ff, h),
                          f"{prefix}mlp.down_proj.weight": (h, ff), f"{prefix}input_layernorm.weight": (h,),
                          f"{prefix}post_attention_layernorm.weight": (h,)})
            layer += 1
    shards[1].update(_vision_shapes("model.vision_tower.vision_tower.vision_model.", 36))
    shards[2].update({"model.norm.weight": (h,), "lm_head.weight": (TEXT["vocab_size"], h),
                      "model.mm_projector.0.weight": (h, VISION["hidden_size"]),
                      "model.mm_projector.0.bias": (h,), "model.mm_projector.2.weight": (h, h),
                      "model.mm_projector.2.bias": (h,)})
    return shards


def make_checkpoint(folder: Path) -> None:
    """Write the benchmark checkpoint (tokenizer and configs from the tiny builder)."""
    (folder / "clip").mkdir(parents=True)
    weight_map = {}
    shards = _text_shards()
    for index, (shapes, dtype) in enumerate(zip(shards, SHARD_DTYPES), start=1):
        name = f"pytorch_model-{index:05d}-of-{len(shards):05d}.bin"
        save_state_dict({k: _filled(s, dtype, i) for i, (k, s) in enumerate(shapes.items())}, folder / name)
        weight_map.update({k: name for k in shapes})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {**geochat_config(), **TEXT, "mm_hidden_size": VISION["hidden_size"],
              "torch_dtype": "bfloat16", "mm_use_im_patch_token": False}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.model").write_bytes(train_tokenizer())
    clip = {k: _filled(s, "float32", i) for i, (k, s) in enumerate(_vision_shapes("vision_model.", 24).items())}
    save_state_dict(clip, folder / "clip" / "pytorch_model.bin")
    vision = {**VISION, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768}
    (folder / "clip" / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": vision}))


_CONVERT = """
import sys
from pathlib import Path
if {block_torch!r}:  # as in a runtime without torch (transformers then leaves it alone too)
    sys.modules["torch"] = None
sys.path.insert(0, {root!r})
from geochat_qgis.core.weights.convert_hf import convert_geochat_to_hf
from geochat_qgis.core.weights.gguf_writer import convert_geochat_to_gguf
convert = convert_geochat_to_hf if {fmt!r} == "hf" else convert_geochat_to_gguf
convert(Path({src!r}), Path({out!r}))
print("TORCH", sys.modules.get("torch") is not None)
"""

_PARITY = """
import sys, torch, numpy as np
from pathlib import Path
sys.path.insert(0, {root!r})
from geochat_qgis.core.weights.torch_zip import read_torch_checkpoint
count = 0
for shard in sorted(Path({src!r}).rglob("*.bin")):
    theirs = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
    mine = read_torch_checkpoint(shard)
    assert list(mine) == list(theirs), shard
    for name, tensor in theirs.items():
        data = tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        assert mine[name].dtype == str(tensor.dtype)[6:] and mine[name].shape == tuple(tensor.shape), name
        assert mine[name].array.tobytes() == data.tobytes(), name
        count += 1
    del theirs, mine
print("TENSORS", count)
"""


def run(code: str, env: dict[str, str]) -> tuple[float, float, str]:
    """(peak RSS in GiB, seconds, stdout) of ``code`` in a fresh interpreter: its own VmHWM
    (ru_maxrss would include this parent's RSS at fork time)."""
    report = ("\nfor line in open('/proc/self/status'):\n"
              "    if line.startswith('VmHWM:'):\n        print('PEAK', line.split()[1])\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code + report], check=True, capture_output=True, text=True,
                          env={**os.environ, **env})
    seconds = time.monotonic() - start
    peak_kib = int(done.stdout.strip().splitlines()[-1].split()[1])
    return peak_kib / 2**20, seconds, done.stdout


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/geochat-convert-bench"),
                        help="where the checkpoint and outputs go (made, then deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    args = parser.parse_args()
    src = args.dir / "geochat"
    if not src.is_dir():
        start = time.monotonic()
        shutil.rmtree(args.dir, ignore_errors=True)
        make_checkpoint(src)
        print(f"made {src} in {time.monotonic() - start:.0f} s")
    try:
        return measure(args.dir, src, args.keep)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


def measure(base: Path, src: Path, keep: bool) -> int:
    bins = sorted(src.rglob("*.bin"))
    largest = max(p.stat().st_size for p in bins) / 2**30
    total = sum(p.stat().st_size for p in bins) / 2**30
    params = sum(math.prod(s) for shard in _text_shards() for s in shard.values()) / 1e9
    print(f"checkpoint: {params:.2f}B parameters in {', '.join(SHARD_DTYPES)} shards + a float32 CLIP .bin; "
          f"{len(bins)} .bin files {total:.2f} GiB, largest {largest:.2f} GiB")
    ok = True
    for fmt in ("hf", "gguf"):
        hashes: dict[str, dict[str, str]] = {}
        best: dict[str, tuple[float, float]] = {}
        for reader in ("torch", "numpy", "numpy", "torch"):  # each twice, in both orders: best of 2
            out = base / f"out-{fmt}-{reader}"
            shutil.rmtree(out, ignore_errors=True)
            code = _CONVERT.format(root=str(ROOT), src=str(src), out=str(out), fmt=fmt,
                                   block_torch=reader == "numpy")
            rss, seconds, stdout = run(code, {"GEOCHAT_PICKLE_READER": reader})
            hashes[reader] = digest(out)
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**30
            if not keep:
                shutil.rmtree(out, ignore_errors=True)
            best[reader] = min(best.get(reader, (rss, seconds)), (rss, seconds), key=lambda r: r[1])
            print(f"--to {fmt:4s} reader {reader:5s}: {seconds:6.1f} s, peak RSS {rss:5.2f} GiB "
                  f"(largest shard {rss - largest:+.2f} GiB), output {size:.2f} GiB, torch imported: "
                  f"{'TORCH True' in stdout}", flush=True)
            if reader == "numpy":
                ok &= rss <= largest + 1
        ratio = best["numpy"][1] / best["torch"][1]
        ok &= ratio <= 1.0
        print(f"--to {fmt}: best of 2, numpy {best['numpy'][1]:.1f} s / torch {best['torch'][1]:.1f} s "
              f"= {ratio:.2f}; peak RSS {best['numpy'][0]:.2f} vs {best['torch'][0]:.2f} GiB")
        same = hashes["torch"] == hashes["numpy"]
        ok &= same
        print(f"--to {fmt}: outputs of the two readers byte-identical: {same} ({len(hashes['numpy'])} files)")
    rss, seconds, stdout = run(_PARITY.format(root=str(ROOT), src=str(src)), {})
    print(f"tensor parity, torch.load vs numpy reader: {stdout.split('TENSORS')[1].split()[0]} tensors "
          f"bit-identical ({seconds:.1f} s)")
    print("goals (numpy no slower, its peak <= largest shard + 1 GiB, identical outputs):",
          "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
