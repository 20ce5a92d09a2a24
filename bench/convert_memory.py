"""Benchmark: peak memory of the streaming GeoChat conversion against the largest shard.

A random GeoChat-style checkpoint of about 1B parameters is made once into bench/.cache/
(Llama text model 2048 wide x 19 layers, float16, two pickle ``.bin`` shards
the way GeoChat splits its 7B checkpoint, the saved vision tower copy, and a full-size
CLIP-L/14-336 vision tower in float32 under ``clip/``). Each conversion runs in a fresh process
and its peak RSS (``VmHWM``) is compared with the largest shard (goal: <= largest shard +
2 GB) and with the raw libraries doing the same work the obvious way in the same run: every
shard ``torch.load``-ed, renamed in memory and written by ``safetensors.torch.save_file``.

    .venv/bin/python bench/convert_memory.py [--keep]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"
SRC = CACHE / "geochat-1b"
sys.path.insert(0, str(ROOT))

# vocabulary: the tiny builder's 512-piece tokenizer (a 32000-piece one cannot be trained offline)
TEXT = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 19,
        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 512}
VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
          "num_attention_heads": 16, "image_size": 336, "patch_size": 14}


def _filled(shape: tuple[int, ...], dtype, seed: int):
    """A tensor of random-looking values, cheap to make (a random block tiled)."""
    import torch

    block = torch.randn(1 << 16, generator=torch.Generator().manual_seed(seed)) * 0.02
    count = 1
    for side in shape:
        count *= side
    return block.repeat(count // block.numel() + 1)[:count].reshape(shape).to(dtype)


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
    h, ff, layers = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["num_hidden_layers"]
    first = {"model.embed_tokens.weight": (TEXT["vocab_size"], h)}
    second: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        shard = first if i < layers * 7 // 10 else second  # GeoChat: 9.98 GB + 4.15 GB
        layer = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shard[f"{layer}self_attn.{name}.weight"] = (h, h)
        shard.update({f"{layer}mlp.gate_proj.weight": (ff, h), f"{layer}mlp.up_proj.weight": (ff, h),
                      f"{layer}mlp.down_proj.weight": (h, ff), f"{layer}input_layernorm.weight": (h,),
                      f"{layer}post_attention_layernorm.weight": (h,)})
    second.update({"model.norm.weight": (h,), "lm_head.weight": (TEXT["vocab_size"], h),
                   "model.mm_projector.0.weight": (h, VISION["hidden_size"]),
                   "model.mm_projector.0.bias": (h,), "model.mm_projector.2.weight": (h, h),
                   "model.mm_projector.2.bias": (h,)})
    second.update(_vision_shapes("model.vision_tower.vision_tower.vision_model.", 36))
    return [first, second]


def make_checkpoint(folder: Path) -> None:
    """Write the benchmark checkpoint (tokenizer and configs from the tiny builder) atomically."""
    import torch
    from safetensors.torch import save_file

    from geochat_qgis.core.weights.tiny import geochat_config, train_tokenizer

    temp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(temp, ignore_errors=True)
    (temp / "clip").mkdir(parents=True)
    weight_map = {}
    shards = _text_shards()
    for index, shapes in enumerate(shards, start=1):
        name = f"pytorch_model-{index:05d}-of-{len(shards):05d}.bin"
        torch.save({k: _filled(s, torch.float16, i) for i, (k, s) in enumerate(shapes.items())}, temp / name)
        weight_map.update({k: name for k in shapes})
    (temp / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {**geochat_config(), **TEXT, "mm_hidden_size": VISION["hidden_size"],
              "torch_dtype": "float16", "mm_use_im_patch_token": False}
    (temp / "config.json").write_text(json.dumps(config, indent=2))
    (temp / "tokenizer.model").write_bytes(train_tokenizer())
    clip = {k: _filled(s, torch.float32, i) for i, (k, s) in enumerate(_vision_shapes("vision_model.", 24).items())}
    save_file(clip, str(temp / "clip" / "model.safetensors"))
    vision = {**VISION, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768}
    (temp / "clip" / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": vision}))
    temp.rename(folder)


_OURS = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from geochat_qgis.core.weights.convert_hf import convert_geochat_to_hf
from geochat_qgis.core.weights.gguf_writer import convert_geochat_to_gguf
convert = convert_geochat_to_hf if {fmt!r} == "hf" else convert_geochat_to_gguf
convert(Path({src!r}), Path({out!r}))
"""

_NAIVE = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
src, out = Path({src!r}), Path({out!r})
state = {{}}
for shard in sorted(src.glob("pytorch_model-*.bin")):
    state.update(torch.load(shard, map_location="cpu", weights_only=True))
state = {{("language_model." + k if not k.startswith("model.mm_") else k): v.contiguous()
         for k, v in state.items() if not k.startswith("model.vision_tower.")}}
state.update({{"vision_tower." + k: v.half() for k, v in load_file(str(src / "clip" / "model.safetensors")).items()}})
out.mkdir()
save_file(state, str(out / "model.safetensors"))
"""

_IMPORTS = """
import sys
sys.path.insert(0, {root!r})
import torch, transformers, safetensors, gguf, sentencepiece
import geochat_qgis.core.weights.gguf_writer, geochat_qgis.core.weights.convert_hf
"""


def peak_rss(code: str) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of ``code`` run in a fresh interpreter.

    The peak is the process's own VmHWM: ru_maxrss would include this parent's RSS at fork time.
    """
    report = ("\nfor line in open('/proc/self/status'):\n"
              "    if line.startswith('VmHWM:'):\n        print('PEAK', line.split()[1])\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code + report], check=True, capture_output=True, text=True)
    seconds = time.monotonic() - start
    peak_kib = int(done.stdout.strip().splitlines()[-1].split()[1])
    return peak_kib / 2**20, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the converted outputs")
    args = parser.parse_args()
    if not SRC.is_dir():
        start = time.monotonic()
        make_checkpoint(SRC)
        print(f"made {SRC} in {time.monotonic() - start:.0f} s")
    shards = sorted(SRC.glob("pytorch_model-*.bin"))
    largest = max(p.stat().st_size for p in shards) / 2**30
    total = sum(p.stat().st_size for p in shards) / 2**30
    clip = (SRC / "clip" / "model.safetensors").stat().st_size / 2**30
    shapes = [s for shard in _text_shards() for s in shard.values()]
    shapes += list(_vision_shapes("", 24).values())
    params = sum(math.prod(shape) for shape in shapes) / 1e9
    print(f"checkpoint: {params:.2f}B parameters ({len(shapes)} tensors, CLIP tower included), "
          f"shards {total:.2f} GiB (largest {largest:.2f} GiB), CLIP tower {clip:.2f} GiB")
    results = {}
    runs = [("imports only", _IMPORTS, None), ("ours: --to hf", _OURS, "hf"),
            ("ours: --to gguf", _OURS, "gguf"), ("raw torch.load + save_file", _NAIVE, "naive")]
    for label, template, fmt in runs:
        out = CACHE / f"out-{fmt}"
        shutil.rmtree(out, ignore_errors=True)
        code = template.format(root=str(ROOT), src=str(SRC), out=str(out), fmt=fmt)
        results[label] = peak_rss(code)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        rss, seconds = results[label]
        print(f"{label:28s} peak RSS {rss:6.2f} GiB  ({rss / largest:4.2f} x largest shard, "
              f"{rss - largest:+.2f} GiB over it)  {seconds:5.1f} s", flush=True)
    naive = results["raw torch.load + save_file"][0]
    for label in ("ours: --to hf", "ours: --to gguf"):
        rss = results[label][0]
        verdict = "ok" if rss <= largest + 2 else "OVER"
        print(f"{label}: {rss / naive:.2f} x the raw libraries' peak; goal largest shard + 2 GiB: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
