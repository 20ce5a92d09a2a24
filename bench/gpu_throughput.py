"""Tiles per minute of the batched transformers backend against batch-1 ``generate`` on a GPU.

A random-weight LLaVA with GeoChat-7B's dimensions (Vicuna-7B text model, CLIP ViT-L/14 at
504 px: 1296 image tokens, mlp2x_gelu projector) in bfloat16 with SDPA attention. Every tile gets
exactly ``--new-tokens`` (default 200) new tokens (``min_new_tokens`` keeps a random model from
stopping early), so both paths do the same work. The processor (tokenizer + PIL image processor)
comes from the project's tiny GeoChat; only its vocabulary is small.

    python bench/gpu_throughput.py [--batch-size 16] [--tiles 32] [--single-tiles 6]

Needs CUDA: without it the script says so and exits with status 2. ``--smoke`` runs tiny
dimensions on the CPU to check the script itself. Goal: batched >= 4x batch-1.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GEOCHAT_7B_TEXT = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
                   "vocab_size": 32004,
                   "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}
GEOCHAT_7B_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "image_size": 504, "patch_size": 14,
                     "projection_dim": 768}
SMOKE_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16}
SMOKE_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2}


def random_llava(tiny_dir: Path, text: dict, vision: dict, device: str, dtype):
    """A random-weight LlavaForConditionalGeneration: the tiny checkpoint's config, resized."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig.from_pretrained(tiny_dir)
    for key, value in text.items():
        setattr(config.text_config, key, value)
    for key, value in vision.items():
        setattr(config.vision_config, key, value)
    config.text_config.vocab_size = max(config.text_config.vocab_size, config.image_token_id + 1)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(
                config, attn_implementation="sdpa", dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tiles", type=int, default=32, help="tiles for the batched run")
    parser.add_argument("--single-tiles", type=int, default=6, help="tiles for batch-1")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny dimensions on the CPU: checks the script, measures nothing")
    args = parser.parse_args()

    import torch
    from transformers import AutoProcessor

    from geochat_qgis.core.backends.base import Conversation, GenerateOptions
    from geochat_qgis.core.backends.transformers_backend import TransformersBackend
    from geochat_qgis.core.families import get_family
    from geochat_qgis.core.families.llava_v1 import llava_v1_prompt
    from geochat_qgis.core.weights.tiny import build_tiny_geochat

    if args.smoke:
        device, dtype, text, vision = "cpu", torch.float32, SMOKE_TEXT, SMOKE_VISION
    elif not torch.cuda.is_available():
        print("bench/gpu_throughput.py needs an NVIDIA GPU with CUDA (torch sees none here). Run "
              "it on a CUDA machine, or pass --smoke to check the script on the CPU.",
              file=sys.stderr)
        return 2
    else:
        device, text, vision = "cuda", GEOCHAT_7B_TEXT, GEOCHAT_7B_VISION
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        tiny_dir = build_tiny_geochat(Path(tmp) / "tiny", "hf")
        processor = AutoProcessor.from_pretrained(tiny_dir, backend="pil")
        model = random_llava(tiny_dir, text, vision, device, dtype)
    model.generation_config.eos_token_id = None  # no early stop: same work on every path
    backend = TransformersBackend.from_loaded(model, processor, "geochat-7b-dims-random",
                                              args.batch_size)
    family = get_family("geochat")
    question = family.build_prompt("refer", "airplane")
    conversation = Conversation.single(question)
    options = GenerateOptions(max_new_tokens=args.new_tokens)
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (504, 504, 3), dtype=np.uint8)
             for _ in range(max(args.tiles, args.single_tiles))]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    # warm-up: kernels, allocator, cuBLAS handles
    backend.generate(tiles[:2], conversation, GenerateOptions(max_new_tokens=4))

    prompt = llava_v1_prompt(conversation.pairs())
    from PIL import Image

    sync()
    start = time.perf_counter()
    single_tokens = 0
    for tile in tiles[: args.single_tiles]:
        inputs = processor(images=[Image.fromarray(tile)], text=[prompt],
                           return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
        single_tokens += out.shape[1] - inputs["input_ids"].shape[1]
    sync()
    single_s = time.perf_counter() - start

    start = time.perf_counter()
    for first in range(0, args.tiles, args.batch_size):
        backend.generate(tiles[first: first + args.batch_size], conversation, options)
    sync()
    batched_s = time.perf_counter() - start

    single_rate = args.single_tiles / single_s * 60
    batched_rate = args.tiles / batched_s * 60
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    parameters = sum(p.numel() for p in model.parameters())
    print(f"device: {name}; dtype: {str(dtype).replace('torch.', '')}; model: LLaVA "
          f"{parameters / 1e9:.2f} B parameters (text {text['hidden_size']} x "
          f"{text['num_hidden_layers']}, vision {vision['hidden_size']} x "
          f"{vision['num_hidden_layers']} at {vision.get('image_size', 504)} px), random weights")
    print(f"batch-1 generate: {args.single_tiles} tiles, {single_tokens} new tokens, "
          f"{single_s:.1f} s -> {single_rate:.1f} tiles/min")
    print(f"batched backend (batch {args.batch_size}): {args.tiles} tiles, "
          f"{args.tiles * args.new_tokens} new tokens, {batched_s:.1f} s -> "
          f"{batched_rate:.1f} tiles/min")
    if device == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    ratio = batched_rate / single_rate
    print(f"ratio batched / batch-1: {ratio:.2f}x (goal >= 4x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
