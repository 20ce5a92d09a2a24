"""GeoPixel tiles per minute on a GPU: batch 1 against batched, at GeoPixel-7B's real sizes.

The project's GeoPixel (core/models/geopixel) built in GPU memory at GeoPixel-7B's sizes
(InternLM2-7B with Partial LoRA, 32 layers; CLIP ViT-L/14 at 560 px; SAM-2 Hiera-L) in bfloat16
with random weights (no 18 GB checkpoint to write or read), the decoder's embeddings and head set
as the tiny maker's ``seg_answer="twice"`` sets them, so every answer is ``<p> a </p> [SEG]``
repeated for ``--tokens`` tokens and SAM-2 turns each [SEG] into a mask: every tile does the
same work. 1680 px tiles (4,081 image tokens each). Batch 1 is ``answer`` per tile; batched is
``answer_many`` over ``--batch`` tiles (one CLIP batch, one left-padded decoding batch, one
SAM-2 batch). The batched answers are checked against batch 1 (same tokens, same mask count).

    python bench/geopixel_gpu.py [--batch 8] [--tiles 16] [--single 4] [--tokens 32] [--dry]

Needs CUDA (exit 2 without it); ``--dry`` runs the same steps on the CPU at the tiny sizes
(checks the script, measures nothing). Part of bench/gpu_suite.sh.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUERY = "Could you provide a segmentation mask for the buildings in this image?"


def build(preset: str, device: str, dtype: str, tmp: Path):
    """A GeoPixelModel of ``preset``'s sizes with random weights, built on ``device``."""
    import torch

    from geochat_qgis.core.models.geopixel.config import GeoPixelConfig
    from geochat_qgis.core.models.geopixel.decoder import InternLM2Decoder
    from geochat_qgis.core.models.geopixel.modeling import GeoPixelModel, resolve_dtype
    from geochat_qgis.core.models.geopixel.sam2 import GeoPixelSam2
    from geochat_qgis.core.models.geopixel.tiny import _bigram, _seg_chain, preset_configs
    from geochat_qgis.core.models.geopixel.tokenizer import InternLM2Tokenizer, write_tiny_tokenizer
    from geochat_qgis.core.models.geopixel.vision import IXCVision

    vocab = write_tiny_tokenizer(tmp, seed=0)
    tokenizer = InternLM2Tokenizer(tmp)
    text, vision, sam2 = preset_configs(preset, vocab)
    config = GeoPixelConfig(text=text, vision=vision, sam2=sam2)
    torch.manual_seed(0)
    torch_dtype = resolve_dtype(dtype)
    with torch.device(device):
        parts = [InternLM2Decoder(text), IXCVision(vision), GeoPixelSam2(sam2)]
    for part in parts:
        part.to(dtype=torch_dtype).eval().requires_grad_(False)
    decoder = parts[0]
    for weight in decoder.parameters():  # the decoder's linears start uninitialised (torch.empty)
        if weight.ndim >= 2:
            torch.nn.init.normal_(weight, std=0.02)
    # the demo answer: the tiny maker's bigram on the embeddings and the head, layers damped
    state = {"model.tok_embeddings.weight": decoder.tok_embeddings.weight.data,
             "output.weight": decoder.output.weight.data}
    for index, layer in enumerate(decoder.layers):
        state[f"model.layers.{index}.attention.wo.weight"] = layer.attention.wo.weight.data
        state[f"model.layers.{index}.feed_forward.w2.weight"] = layer.feed_forward.w2.weight.data
    _bigram(state, _seg_chain(tokenizer), repeat=True, eos=tokenizer.eos_id)
    return GeoPixelModel(config, tokenizer, *parts)


def tiles(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (1680, 1680, 3), dtype=np.uint8) for _ in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tiles", type=int, default=16, help="tiles for the batched run")
    parser.add_argument("--single", type=int, default=4, help="tiles for batch 1")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args()
    import torch

    if args.dry:
        device, preset = "cpu", "tiny"
        args.tiles, args.single, args.batch = min(args.tiles, 4), min(args.single, 2), 2
    elif not torch.cuda.is_available():
        print("bench/geopixel_gpu.py needs an NVIDIA GPU with CUDA (torch sees none); --dry "
              "checks it on the CPU.", file=sys.stderr)
        return 2
    else:
        device, preset = "cuda", "real-width"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="geopixel-gpu-") as tmp:
        model = build(preset, device, "bfloat16", Path(tmp))
    build_s = time.perf_counter() - start
    images = tiles(max(args.tiles, args.single))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    model.answer_many(images[:2], [QUERY] * 2, max_new_tokens=4)  # warm-up: kernels, allocator
    sync()
    start = time.perf_counter()
    single = [model.answer(image, QUERY, max_new_tokens=args.tokens) for image in images[:args.single]]
    sync()
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = []
    for first in range(0, args.tiles, args.batch):
        chunk = images[first:first + args.batch]
        batched += model.answer_many(chunk, [QUERY] * len(chunk), max_new_tokens=args.tokens)
    sync()
    batched_s = time.perf_counter() - start
    same = sum(a.token_ids == b.token_ids and a.mask_logits.shape == b.mask_logits.shape
               for a, b in zip(single, batched))
    figures = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry: tiny sizes)",
        "sizes": preset, "dtype": "bfloat16", "build_s": round(build_s, 1),
        "tokens_per_answer": len(single[0].token_ids), "masks_per_answer": int(single[0].mask_logits.shape[0]),
        "batch1_tiles_per_min": round(args.single / single_s * 60, 2),
        "batched_tiles_per_min": round(args.tiles / batched_s * 60, 2), "batch": args.batch,
        "batched_equals_batch1": f"{same} of {len(single)}",
    }
    figures["ratio"] = round(figures["batched_tiles_per_min"] / figures["batch1_tiles_per_min"], 2)
    if device == "cuda":
        figures["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
