"""Seconds per GeoPixel answer: the project's port against GeoPixel's own ``evaluate``, on the CPU.

Both answer the same question about the same 1680 px tile (GeoPixel's 3 x 3 crops + global view:
4,081 prompt tokens) with the same checkpoint: GeoPixel-7B's real widths (InternLM2 4096 wide,
32 heads / 8 KV, FF 14336, vocabulary 92,547; CLIP ViT-L/14 at 560 px; SAM-2 Hiera-L) with
random weights and ``--layers`` decoder layers (default 1), written by the project's own maker
(``write_tiny_geopixel(preset="real-width", seg_answer="twice")``: greedy decoding says
``<p> a </p> [SEG]`` again and again, so both run 32 tokens and SAM-2 masks). Each side runs in
a process of its own (peak RSS is that process's): GeoPixel from ``--geopixel-src`` in its own
environment (``--ref-python``; bench/geopixel_reference_model.py loads it, patching only device,
attention, font and downloads), the project in this Python. The project's figures are kept in
bench/.cache/geopixel_speed/ (``--reuse-ours`` takes them instead of running it again).

GeoPixel's ``evaluate`` has no KV cache: every new token re-runs the whole 4,081+ token sequence
and the vocabulary projection of every position. Its first ``--ref-tokens`` steps are timed and
the rest of a ``--tokens`` answer is extrapolated from them (each step costs the same full
forward; the sequence grows by under 1 %), unless ``--ref-tokens`` equals ``--tokens``.
The full 7B on this CPU is extrapolated from the per-layer times measured in the project's run
(forward hooks on the decoder layers: prompt and per-token cost of one layer) and for GeoPixel
from its measured step time scaled by the decoder's share. Goal: project >= 10x faster.

    python bench/geopixel_speed.py --geopixel-src DIR --ref-python /path/to/venv/bin/python \
        [--layers 1] [--tokens 32] [--ref-tokens 3] [--threads 2] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / ".cache" / "geopixel_speed"
QUERY = "Could you provide a segmentation mask for the buildings in this image?"
GB = 1e9

REF_DRIVER = r"""
import contextlib, json, resource, sys, time
from pathlib import Path
bench, src, ckpt, image, query, tokens, dtype, threads = sys.argv[1:9]
sys.path.insert(0, bench)
import torch
torch.set_num_threads(int(threads))
import geopixel_reference_model as ref
start = time.perf_counter()
model, tok = ref.load(Path(src), Path(ckpt), dtype)[:2]
load_s = time.perf_counter() - start
calls, original = [], model.forward
def timed(*args, **kwargs):
    began, cpu = time.perf_counter(), time.process_time()
    out = original(*args, **kwargs)
    rows = kwargs.get("inputs_embeds")
    calls.append((began, time.perf_counter(), int(rows.shape[1]) if rows is not None else None,
                  time.process_time() - cpu))
    return out
model.forward = timed
amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
with ref.cuda_is_cpu(), amp, torch.no_grad():
    begin, cpu = time.perf_counter(), time.process_time()
    reply, masks = model.evaluate(tok, query, images=[image], max_new_tokens=int(tokens))
    end, cpu = time.perf_counter(), time.process_time() - cpu
n_masks = int(masks[0].shape[0]) if masks and len(masks[0]) else 0
print(json.dumps({"load_s": load_s, "answer_s": end - begin, "before_s": calls[0][0] - begin,
                  "steps_s": [b - a for a, b, _, _ in calls], "after_s": end - calls[-1][1],
                  "answer_cpu_s": cpu, "steps_cpu_s": [c for _, _, _, c in calls],
                  "prompt_rows": calls[0][2], "reply": reply, "masks": n_masks,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def tile_png(folder: Path) -> Path:
    """The demo raster (rasterio test data) resized to 1680 x 1680, as an 8-bit RGB PNG."""
    from PIL import Image
    import rasterio

    path = folder / "tile-1680.png"
    if not path.exists():
        with rasterio.open(ROOT / "resources" / "demo" / "cogeo.tif") as src:
            rgb = src.read([1, 2, 3]).transpose(1, 2, 0)
        Image.fromarray(rgb).resize((1680, 1680), Image.BILINEAR).save(path)
    return path


def checkpoint(layers: int) -> Path:
    """GeoPixel-7B's widths with ``layers`` decoder layers, random weights, written once."""
    from geochat_qgis.core.models.geopixel.tiny import write_tiny_geopixel

    folder = CACHE / f"real-width-{layers}-layers"
    if not (folder / "config.json").is_file():
        staging = folder.with_name(folder.name + ".partial")
        if staging.exists():
            import shutil

            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        write_tiny_geopixel(staging, seed=0, preset="real-width", layers=layers,
                            seg_answer="twice")
        staging.rename(folder)
    return folder


def run_side(command: list[str], env: dict) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ours(folder: Path, image: Path, tokens: int, dtype: str, threads: int) -> dict:
    """The project's answer in this process (run as ``--side ours``): seconds, phases, RSS."""
    import resource

    import numpy as np
    import torch
    from PIL import Image

    from geochat_qgis.core.models.geopixel.modeling import GeoPixelModel

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = GeoPixelModel.from_folder(folder, device="cpu", dtype=dtype)
    load_s = time.perf_counter() - start
    layer_s: list[list[float]] = []

    began: dict[str, float] = {}

    def before(module, args):  # a layer starts with its attention norm...
        began["t"], began["rows"] = time.perf_counter(), args[0].shape[-2]

    def after(module, args, out):  # ...and ends with its feed-forward
        layer_s.append([began["rows"], time.perf_counter() - began["t"]])

    for layer in model.decoder.layers:
        layer.attention_norm.register_forward_pre_hook(before)
        layer.feed_forward.register_forward_hook(after)
    tile = np.asarray(Image.open(image).convert("RGB"))
    begin, cpu = time.perf_counter(), time.process_time()
    answer = model.answer(tile, QUERY, max_new_tokens=tokens)
    answer_s, answer_cpu_s = time.perf_counter() - begin, time.process_time() - cpu
    n_layers = len(model.decoder.layers)
    prompt = [s for rows, s in layer_s if rows > 1]
    steps = [s for rows, s in layer_s if rows == 1]
    weights = sum(p.numel() * p.element_size() for part in (model.decoder, model.vision, model.sam2)
                  for p in part.parameters())
    per_layer = sum(p.numel() * p.element_size() for p in model.decoder.layers[0].parameters())
    return {"load_s": load_s, "answer_s": answer_s, "answer_cpu_s": answer_cpu_s, "reply": answer.text,
            "tokens": len(answer.token_ids), "masks": int(answer.mask_logits.shape[0]),
            "prompt_rows": int(max(rows for rows, _ in layer_s)), "layers": n_layers,
            "hidden": model.config.text.hidden_size,
            "layer_prompt_s": sum(prompt) / n_layers, "layer_step_s": sum(steps) / n_layers,
            "weights_bytes": weights, "layer_bytes": per_layer,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def report(mine: dict, theirs: dict, args: argparse.Namespace) -> dict:
    """Seconds per answer both ways, the ratio, and the 7B on this CPU, extrapolated."""
    steps = theirs["steps_s"]
    measured, tokens = len(steps), mine["tokens"]  # greedy both ways: the same answer length
    rows = theirs["prompt_rows"] or mine["prompt_rows"]
    mean_t = (measured - 1) / 2
    per_step = sum(steps) / measured
    extra = sum(per_step * (rows + t) / (rows + mean_t) for t in range(measured, tokens))
    ref_answer = theirs["answer_s"] + extra
    cpu_step = sum(theirs["steps_cpu_s"]) / measured  # CPU seconds: less sensitive to other load
    ref_cpu = theirs["answer_cpu_s"] + cpu_step * sum((rows + t) / (rows + mean_t)
                                                      for t in range(measured, tokens))
    layers, full = mine["layers"], 32
    ours_7b = mine["answer_s"] + (full - layers) * (mine["layer_prompt_s"] + mine["layer_step_s"])
    # GeoPixel's step: (layers x layer cost + vocabulary head) over the whole sequence; the
    # project's per-layer prompt time is the cost of one layer over the same sequence
    layer_full = mine["layer_prompt_s"]
    ref_7b = ref_answer + tokens * (full - layers) * layer_full
    kv_per_layer = 2 * (rows + tokens) * 8 * 128 * 2  # bf16 K and V, 8 KV heads of 128
    rss_7b = mine["peak_rss"] + (full - layers) * (mine["layer_bytes"] + kv_per_layer)
    return {
        "checkpoint": f"{mine['hidden']} wide, {layers} decoder layer(s), random weights, "
                      f"{args.dtype}",
        "prompt_tokens": rows, "answer_tokens": tokens, "threads": args.threads,
        "ours_s": round(mine["answer_s"], 1), "geopixel_s": round(ref_answer, 1),
        "geopixel_measured_steps": measured, "geopixel_step_s": round(per_step, 1),
        "ratio": round(ref_answer / mine["answer_s"], 1),
        "ours_cpu_s": round(mine["answer_cpu_s"], 1), "geopixel_cpu_s": round(ref_cpu, 1),
        "ratio_cpu_time": round(ref_cpu / mine["answer_cpu_s"], 1),
        "ours_peak_rss_gb": round(mine["peak_rss"] / GB, 2),
        "geopixel_peak_rss_gb": round(theirs["peak_rss"] / GB, 2),
        "ours_layer_prompt_s": round(mine["layer_prompt_s"], 2),
        "ours_layer_token_s": round(mine["layer_step_s"] / max(tokens - 1, 1), 4),
        "ours_7b_s_per_tile": round(ours_7b), "geopixel_7b_s_per_tile": round(ref_7b),
        "ours_7b_peak_rss_gb": round(rss_7b / GB, 1),
        "replies_equal": mine["reply"] == theirs["reply"] if measured == tokens else None,
        "ours_reply": mine["reply"], "geopixel_reply": theirs["reply"],
        "masks": [mine["masks"], theirs["masks"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--geopixel-src", type=Path, help="a GeoPixel source folder (clone)")
    parser.add_argument("--ref-python", default=sys.executable,
                        help="the Python of GeoPixel's environment (transformers 4.33.2)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--ref-tokens", type=int, default=3,
                        help="GeoPixel's steps actually run (the rest extrapolated)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--reuse-ours", action="store_true",
                        help="the project's figures of an earlier run with the same choices")
    parser.add_argument("--side", choices=("ours",), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path,
                        help="another checkpoint folder (default: the real-width one, built once)")
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "ours":
        print(json.dumps(ours(args.checkpoint, args.image, args.tokens, args.dtype, args.threads)))
        return 0
    if args.geopixel_src is None or not (args.geopixel_src / "model" / "geopixel.py").is_file():
        parser.error("--geopixel-src must be a GeoPixel source folder (with model/geopixel.py)")
    CACHE.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    folder, image = args.checkpoint or checkpoint(args.layers), tile_png(CACHE)
    print(f"checkpoint {folder.name} ready in {time.perf_counter() - start:.0f} s", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    kept = CACHE / f"ours-{folder.name}-{args.tokens}-{args.dtype}-{args.threads}.json"
    if args.reuse_ours and kept.is_file():
        mine = json.loads(kept.read_text())
    else:
        mine = run_side([sys.executable, __file__, "--side", "ours", "--checkpoint", str(folder),
                         "--image", str(image), "--tokens", str(args.tokens), "--dtype",
                         args.dtype, "--threads", str(args.threads)], env)
        kept.write_text(json.dumps(mine))
    print(f"project: {mine['answer_s']:.1f} s for {mine['tokens']} tokens", flush=True)
    theirs = run_side([args.ref_python, "-c", REF_DRIVER, str(ROOT / "bench"),
                       str(args.geopixel_src), str(folder), str(image), QUERY,
                       str(min(args.ref_tokens, args.tokens)), args.dtype, str(args.threads)],
                      {**env, "PYTHONPATH": ""})
    figures = report(mine, theirs, args)
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
