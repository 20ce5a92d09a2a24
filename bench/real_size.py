"""Speed at real model sizes: a tile's image and prompt prefix read once, whatever is asked of it.

Random weights at real dimensions, written by the project's own random-weight GGUF code
(``core/vision/tiny_gguf.py``: numpy, no torch) and quantised to q4_k_m by the converter's
``quantize_gguf``: GeoChat-7B's text model (Vicuna-7B shape) or, with ``--quick``, a Llama of
about 1.1B parameters (TinyLlama's shape), both with CLIP ViT-L/14 at 504 px (23 layers, GeoChat's
tower) and the mlp2x_gelu projector. The vocabulary is a SentencePiece model trained on GeoChat's
prompt language (``core/weights/tiny.py``), padded to Llama's 32,000 pieces, so prompts have
about GeoChat's text length and the output layer its real cost.

On the same tiles in one run, per tile:
- project: the llama.cpp backend (the project's encoder) asks 4 detection prompts; the first
  starts from nothing, the others continue from the tile's evaluated prefix; then a follow-up
  chat turn about the first answer;
- naive: llama-cpp-python's own LLaVA chat handler (what GeoChat's demo and
  ``llama_cpp.server`` do), one full chat completion per prompt: the image encoded and the
  whole prompt evaluated each time; its first prompt is "raw" (one prompt).
Greedy, ``--tokens`` new tokens per answer. Per tile, the one-prompt runs of both ways go back to
back (alternating which is first) so they share the machine's load. The last line is JSON with
the ratios, each the median over tiles of the per-tile ratio.

    python bench/real_size.py --quick          # 1.1B text model, 3 tiles
    python bench/real_size.py [--tiles 2]      # GeoChat-7B dimensions (~4 GB q4_k_m, ~14 GB to build)
    python bench/real_size.py --tiny --cache DIR  # tiny dimensions: the test suite's smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / ".cache" / "real_size"
PHRASES = ("building", "road", "car", "ship")
FOLLOW_UP = "How many of them are there?"
VOCAB = 32000


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """The tiny GeoChat tokenizer's pieces, padded with unused pieces to Llama's 32,000."""
    import sentencepiece as spm

    from geochat_qgis.core.weights.tiny import train_tokenizer

    sp = spm.SentencePieceProcessor(model_proto=train_tokenizer())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    scores = [sp.get_score(i) for i in range(len(pieces))]
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(len(pieces))]
    extra = VOCAB - len(pieces)
    return (pieces + [f"<unused{i}>" for i in range(extra)], scores + [-1e4] * extra,
            kinds + [4] * extra)


def build(variant: str, cache: Path = CACHE) -> Path:
    """The GGUF pair (model.gguf q4_k_m, mmproj.gguf f16) for ``variant``, built once."""
    from geochat_qgis.core.vision.tiny_gguf import (
        LLAMA_1B,
        LLAMA_7B,
        VIT_L_504,
        ClipDims,
        LlamaDims,
        write_llama_gguf,
        write_mlp_mmproj,
    )
    from geochat_qgis.core.weights.quantize import quantize_gguf

    dims = {"1b": LLAMA_1B, "7b": LLAMA_7B, "tiny": LlamaDims()}[variant]
    vision = ClipDims(image_size=504, patch_size=84) if variant == "tiny" else VIT_L_504
    folder = cache / variant
    folder.mkdir(parents=True, exist_ok=True)
    mmproj, model = folder / "mmproj.gguf", folder / "model.gguf"
    if not mmproj.exists():
        start = time.perf_counter()
        write_mlp_mmproj(folder / "mmproj.tmp", dims.n_embd, vision, seed=0, half=True)
        (folder / "mmproj.tmp").replace(mmproj)
        print(f"built {mmproj} in {time.perf_counter() - start:.0f} s", flush=True)
    if not model.exists():
        start = time.perf_counter()
        f16 = folder / "model-f16.gguf"
        write_llama_gguf(f16, dims, seed=0, half=True, vocab=vocabulary())
        written = time.perf_counter() - start
        quantize_gguf(f16, model, "q4_k_m")
        f16.unlink()
        print(f"built {model} (f16 {written:.0f} s, q4_k_m {time.perf_counter() - start - written:.0f} s)",
              flush=True)
    return folder


def naive(folder: Path, threads: int, tokens: int):
    """A function answering (tile, user text) as llama-cpp-python's LLaVA handler does."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    from geochat_qgis.core.backends.images import png_data_uri
    from geochat_qgis.core.families.llava_v1 import SYSTEM

    handler = Llava15ChatHandler(clip_model_path=str(folder / "mmproj.gguf"), verbose=False)
    llama = llama_cpp.Llama(str(folder / "model.gguf"), chat_handler=handler, n_ctx=2048,
                            n_threads=threads, verbose=False)

    def ask(tile, text: str) -> tuple[float, int, float]:
        """(seconds, prompt tokens, seconds llama.cpp spent decoding the prompt: text and
        image embeddings; the rest is libmtmd's image encoder and the answer)."""
        llama_cpp.llama_perf_context_reset(llama.ctx)
        start = time.perf_counter()
        answer = llama.create_chat_completion(messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri(tile)}},
                                         {"type": "text", "text": text}]},
        ], max_tokens=tokens, temperature=0.0, repeat_penalty=1.0)
        seconds = time.perf_counter() - start
        prompt_s = llama_cpp.llama_perf_context(llama.ctx).t_p_eval_ms / 1000
        return seconds, answer["usage"]["prompt_tokens"], prompt_s

    return ask, llama


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 1.1B text model on 3 tiles")
    parser.add_argument("--tiles", type=int, default=None, help="tiles (default 3 quick, 2 7B)")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per answer")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--kv-f32", action="store_true", help="the project with a float32 KV cache")
    parser.add_argument("--no-naive", action="store_true", help="skip llama-cpp-python's handler")
    parser.add_argument("--tiny", action="store_true", help="tiny dimensions (the test's smoke run)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the models are built")
    args = parser.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    import numpy as np

    from geochat_qgis.core.backends.base import Conversation, GenerateOptions, Turn
    from geochat_qgis.core.backends.llama_cpp import LlamaCppBackend, LlamaCppSettings
    from geochat_qgis.core.families import get_family

    variant = "tiny" if args.tiny else "1b" if args.quick else "7b"
    folder = build(variant, args.cache)
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (504, 504, 3), dtype=np.uint8)
             for _ in range(args.tiles or (2 if variant == "7b" else 3))]
    family = get_family("geochat")
    prompts = [family.build_prompt("refer", phrase) for phrase in PHRASES]
    options = GenerateOptions(max_new_tokens=args.tokens)
    settings = LlamaCppSettings(n_threads=args.threads, vision="project", kv_f32=args.kv_f32,
                                vision_device="cpu")
    rows: dict[str, list[float]] = {k: [] for k in ("project_1", "project_4", "first_turn",
                                                    "follow_up", "raw_1", "naive_4")}
    evaluated: dict[str, list[int]] = {k: [] for k in rows}
    ask = llama = None
    if not args.no_naive:
        ask, llama = naive(folder, args.threads, args.tokens)
    with LlamaCppBackend(folder, settings=settings) as project:

        def project_first(tile):
            project.evaluator.forget()
            project.encoder.clear()
            begin = time.perf_counter()
            generation = project.generate([tile], Conversation.single(prompts[0]), options)[0]
            return time.perf_counter() - begin, generation

        for index, tile in enumerate(tiles):
            # one prompt, both ways back to back (which goes first alternates per tile), so
            # both see the same machine load; then the rest of each way's work on the tile
            if ask is not None and index % 2 == 0:
                raw = ask(tile, prompts[0])
            one, first = project_first(tile)
            if ask is not None and index % 2 == 1:
                raw = ask(tile, prompts[0])
            follow_start = time.perf_counter()
            follow = project.generate([tile], Conversation(
                [Turn(prompts[0], first.text), Turn(FOLLOW_UP)]), options)[0]
            follow_s = time.perf_counter() - follow_start
            rest_start = time.perf_counter()
            rest = [project.generate([tile], Conversation.single(text), options)[0]
                    for text in prompts[1:]]
            four = one + time.perf_counter() - rest_start
            if ask is not None:
                runs = [raw] + [ask(tile, text) for text in prompts[1:]]
                rows["raw_1"].append(runs[0][0])
                rows["naive_4"].append(sum(run[0] for run in runs))
                evaluated["raw_1"].append(runs[0][1])
                evaluated["naive_4"].append(sum(run[1] for run in runs))
                print(f"naive: 1 prompt {runs[0][0]:.1f} s (prompt decode {runs[0][2]:.1f} s, "
                      f"the rest libmtmd's encoder and the answer), 4 prompts "
                      f"{rows['naive_4'][-1]:.1f} s", flush=True)
            rows["project_1"].append(one)
            rows["first_turn"].append(one)
            rows["follow_up"].append(follow_s)
            rows["project_4"].append(four)
            first_eval = first.extra["evaluated_tokens"]
            evaluated["project_1"].append(first_eval)
            evaluated["first_turn"].append(first_eval)
            evaluated["follow_up"].append(follow.extra["evaluated_tokens"])
            evaluated["project_4"].append(first_eval + sum(g.extra["evaluated_tokens"] for g in rest))
            print(f"project: 1 prompt {one:.1f} s (image encoder {first.extra['seconds_encode']:.1f}"
                  f" s, prompt {first.extra['seconds_prompt']:.1f} s, answer "
                  f"{first.extra['seconds_answer']:.1f} s), 4 prompts {four:.1f} s, follow-up "
                  f"{follow_s:.1f} s ({evaluated['project_4'][-1]} tokens evaluated)", flush=True)
    if llama is not None:
        llama.close()
    mean = {k: float(np.mean(v)) for k, v in rows.items() if v}
    for name, seconds in mean.items():
        print(f"{name}: {seconds:.2f} s per tile, {np.mean(evaluated[name]):.0f} tokens evaluated")

    def ratio(top: str, bottom: str):
        """The median over tiles of the per-tile ratio (robust to a tile slowed by other load)."""
        if not rows[top] or not rows[bottom]:
            return None
        return round(float(np.median(np.divide(rows[top], rows[bottom]))), 3)

    ratios = {
        "prompts4_over_1": ratio("project_4", "project_1"),
        "naive_over_project_4": ratio("naive_4", "project_4"),
        "followup_over_first": ratio("follow_up", "first_turn"),
        "project_over_raw_1": ratio("project_1", "raw_1"),
    }
    extra = {"variant": variant, "tiles": len(tiles), "threads": args.threads,
             "kv_f32": args.kv_f32, "tokens": args.tokens,
             **{f"{k}_s_per_tile": round(v, 2) for k, v in mean.items()},
             **{f"{k}_tokens_evaluated": round(float(np.mean(evaluated[k]))) for k in mean}}
    print(json.dumps(extra))
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
