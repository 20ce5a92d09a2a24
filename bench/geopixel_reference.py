"""Reference arrays from GeoPixel's own code: its ``evaluate`` on the CPU, every intermediate saved.

Runs in an environment of its own (transformers 4.33.2, torch, torchvision, hydra-core, einops,
sentencepiece; see tests/data/geopixel/README.md), imports GeoPixel from ``--geopixel-src`` (a clone
of mbzuai-oryx/GeoPixel; nothing of it is in this repository) and loads ``GeoPixelForCausalLM`` from a
checkpoint folder in the published layout (config.json, pytorch_model*.bin [+ index], tokenizer).

What is patched, and nothing else (GeoPixel's files are not edited; the patches are assignments
made before the model is built):
1. device: ``torch.Tensor.cuda`` returns the tensor itself while ``evaluate`` runs (its
   ``seg_token_mask ... .cuda()``); the model stays on the CPU.
2. attention: config.attn_implementation = "eager" (GeoPixel's own eager InternLM2Attention)
   instead of flash_attention_2.
3. font: ``get_font`` returns PIL's default font instead of downloading SimHei.ttf (only the video
   path draws text).
4. downloads: the CLIP tower is ``CLIPVisionModel(CLIPVisionConfig(...))`` and SAM-2 is GeoPixel's
   ``build_sam2`` on its sam2_hiera_l.yaml with hydra overrides, both with sizes taken from the
   checkpoint's tensors (not ``from_pretrained('internlm/internlm-xcomposer2d5-clip')`` /
   ``hf_hub_download('facebook/sam2-hiera-large')``); the shards then fill every weight.
   Sizes no tensor shows follow the project's rules (the real values at the real sizes): CLIP heads
   = width / 64 (or config.json's vision_config.num_attention_heads); Hiera heads, windows and
   global-attention blocks from geochat_qgis/core/models/geopixel/sam2_config.hiera_rules (pure
   Python, imported here so the two cannot drift). The sizes used are saved in the meta ("arch").
5. sizes: ``vision_proj`` and ``plora_glb_GN`` / ``plora_sub_GN``, hard-coded 4096 wide in GeoPixel,
   take their widths from the tensors (identical at the real sizes).
6. dtype: SAM-2's ``get_dense_pe`` runs under ``torch.autocast("cpu", torch.bfloat16)``. GeoPixel builds
   its grid in bfloat16 and multiplies it by the Gaussian matrix: in plain float32 that raises
   (bf16 @ f32); under chat.py's bf16 autocast (and with ``model.bfloat16()``) it is a bf16 matmul,
   which this reproduces in a float32 run.
The tokenizer is GeoPixel's InternLM2Tokenizer class, loaded from the checkpoint folder as chat.py
does (pad = unk). Loading fails on any missing or unexpected key.

float32: the model in float32, no autocast. bfloat16: ``model.bfloat16()`` and
``torch.autocast("cpu", torch.bfloat16)`` around evaluate (chat.py's ``autocast("cuda")`` on a CPU).
``--force-reply TEXT`` (once, or once per image) teacher-forces the reply: a logits processor makes
the next token of TEXT + </s> win, so evaluate's whole path, [SEG] masks included, runs on a random
model. Each image also gets a free greedy run (``<i>.free.*``: ids, per-step logits, hidden states).
Arrays are observed with forward hooks and with wrappers that call the original and keep its
result; arrays over ``--limit-kb`` are saved strided (``<name>__stride``). The layout of the .npz
is described in tests/data/geopixel/README.md. GeoPixel's model is built by
geopixel_reference_model.py (same folder).

    python bench/geopixel_reference.py --geopixel-src DIR --checkpoint DIR --out OUT.npz \
        {--images a.png ... | --tiles square1680 ...} [--force-reply "<p> a </p> [SEG]"] \
        [--max-new-tokens 6] [--dtype float32]
    python bench/geopixel_reference.py --geopixel-src DIR --dump-keys OUT.txt [--config C | --checkpoint D]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from geopixel_reference_model import cuda_is_cpu, dump_keys, load, read_shapes  # noqa: E402  (bench/ is sys.path[0])


class Recorder:
    """Forward hooks and call wrappers that keep what GeoPixel computes, unchanged."""

    def __init__(self, model):
        import model.IXC.modeling_internlm_xcomposer2 as ixc

        self.d, self.steps, self.handles, self.restore = {}, [], [], []
        m, vm = model, model.model.visual_model
        self._hook(m, lambda out, k: self.steps.append(out.logits[0, -1].float()))
        self._hook(m.vit, lambda out, k: self.d.setdefault("vit_out", out[0]))
        self._hook(m.vit.vision_tower, lambda out, k: self.d.setdefault("clip_last", out.hidden_states[-1]))
        self._hook(m.vision_proj, lambda out, k: self.d.setdefault("image_embeds", out))
        self._hook(m.model.text_hidden_fcs[0], lambda out, k: self.d.update(fcs_out=out))
        self._hook(vm.sam_prompt_encoder, lambda out, k: self._add("sparse", out[0], "dense", out[1]))
        self._hook(vm.sam_mask_decoder, lambda out, k: self._add(
            "low_res", out[0], "iou", out[1], "dec_image", k["image_embeddings"], "image_pe", k["image_pe"],
            "dec_sparse", k["sparse_prompt_embeddings"]))
        self._wrap(ixc, "Image_transform", lambda r: self.d.setdefault("hd_image", r))
        self._wrap(model, "vis_processor", lambda r: self.d.setdefault("hd_tensor", r))
        self._wrap(model, "interleav_wrap_chat", lambda r: self.d.update(prompt_embeds=r[0]["inputs_embeds"],
                                                                         im_mask=r[1]))
        self._wrap(model, "generate", lambda r: self.d.update(sequences=r["sequences"]))
        self._wrap(model, "get_visual_embs", lambda r: self.d.update(sam_feats=r))
        self._wrap(type(model.model._transform), "__call__", lambda r: self.d.setdefault("sam_pixels", r))
        self._wrap(vm.sam_mask_decoder, "predict_masks", lambda r: self._add("all_iou", r[1]))
        self.handles.append(m.model.text_hidden_fcs[0].register_forward_pre_hook(
            lambda mod, a: self.d.update(fcs_in=a[0]) and None))

    def _hook(self, mod, fn):
        def hook(mod, a, k, out):
            fn(out, k)  # keeps a reference; the output is not changed

        self.handles.append(mod.register_forward_hook(hook, with_kwargs=True))

    def _add(self, *pairs):
        for key, value in zip(pairs[::2], pairs[1::2]):
            self.d.setdefault(key, []).append(value)

    def _wrap(self, owner, name, keep):
        orig, had = getattr(owner, name), name in vars(owner)

        def wrapper(*a, **k):
            out = orig(*a, **k)
            keep(out)
            return out

        setattr(owner, name, wrapper)
        self.restore.append((owner, name, orig, had))

    def close(self):
        for h in self.handles:
            h.remove()
        for owner, name, orig, had in reversed(self.restore):
            if had:
                setattr(owner, name, orig)
            else:
                delattr(owner, name)


def force_processor(ids: list):
    """Logits processor: at step t the t-th forced id wins (GeoPixel's argmax still picks it)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            t = input_ids.shape[1] - 1
            if t < len(ids):
                scores = scores.clone()
                scores[:, ids[t]] = scores.max() + 1e4
            return scores

    return LogitsProcessorList([Force()])


def strided(arr, axes: tuple, limit: int):
    """(arr[::s] along axes, s) with the smallest power-of-two s that fits in limit bytes."""
    s = 1
    while True:
        idx = tuple(slice(None, None, s) if i in axes else slice(None) for i in range(arr.ndim))
        out = arr[idx]
        if out.nbytes <= limit or s >= 64:
            return out, s
        s *= 2


def run_image(model, tok, seg_id: int, image: Path, query: str, force: str | None, max_new: int,
              dtype: str, limit: int, full: bool) -> tuple:
    """GeoPixel's evaluate on one image: ({name: ndarray}, meta); image-side arrays only when full."""
    import torch

    forced = None
    if force is not None:
        forced = tok(force, add_special_tokens=False).input_ids + [tok.eos_token_id]
    rec = Recorder(model)
    kwargs = {"logits_processor": force_processor(forced)} if forced else {}
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    try:
        with cuda_is_cpu(), amp, torch.no_grad():
            reply, masks = model.evaluate(tok, query, images=[str(image)], max_new_tokens=max_new, **kwargs)
    finally:
        rec.close()
    d, out = rec.d, {}

    def f32(t):
        return t.detach().float().cpu().numpy()

    def put(name, arr, axes=(), scale=1):
        arr, s = strided(arr, axes, limit * scale) if axes else (arr, 1)
        out[name] = arr
        if s > 1:
            out[name + "__stride"] = np.array(s)

    ids_after = tok(f"[UNUSED_TOKEN_146]user\n{query}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n",
                    add_special_tokens=False).input_ids
    n_prompt, gen = d["prompt_embeds"].shape[1], d["sequences"][0, 1:].tolist()
    out.update(output_ids=np.array(gen), step_logits=torch.stack(rec.steps).numpy(), n_prompt=np.array(n_prompt))
    hid = d.get("fcs_in", [None])[0]
    if hid is not None:  # evaluate runs text_hidden_fcs on the last step's states whenever images[0] is a path
        out["gen_hidden"] = f32(hid[n_prompt - 1:])
    if full:
        emb = model.model.tok_embeddings
        assert torch.equal(d["prompt_embeds"][0, -len(ids_after):], emb(torch.tensor([ids_after]))[0])
        assert torch.equal(d["prompt_embeds"][0, :1], emb(torch.tensor([[tok.bos_token_id]]))[0])
        hd = np.asarray(d["hd_image"])
        out.update(prompt_ids=np.array([tok.bos_token_id] + ids_after), im_mask=f32(d["im_mask"][0]).astype(np.int8),
                   hd_sha256=np.frombuffer(hashlib.sha256(hd.tobytes()).digest(), np.uint8),
                   prompt_text_embeds=f32(d["prompt_embeds"][0, -len(ids_after):]))
        put("hd_image", hd, (0, 1))
        put("clip_last", f32(d["clip_last"]), (1,))
        put("vit_out", f32(d["vit_out"][0]), (0,))
        put("image_embeds", f32(d["image_embeds"][0]), (0,))
        f = d["sam_feats"]
        put("sam_pixels", f32(d["sam_pixels"]), (1, 2))
        put("sam_image_embed", f32(f["image_embed"][0]), (1, 2))
        put("sam_high_res_0", f32(f["high_res_feats"][0][0]), (1, 2))
        put("sam_high_res_1", f32(f["high_res_feats"][1][0]), (1, 2))
    seg_rows = [n_prompt + i for i, t in enumerate(gen[:-1]) if t == seg_id]
    if full and seg_rows:
        out.update(seg_rows=np.array(seg_rows), seg_hidden=f32(hid[seg_rows]), seg_fcs=f32(d["fcs_out"][0][seg_rows]))
        assert torch.equal(d["dec_image"][0], f["image_embed"].to(torch.bfloat16)), "decoder image is not bf16(embed)"
        cat = lambda key: np.concatenate([f32(x) for x in d[key]])  # noqa: E731
        out.update(sparse=cat("sparse"), dense_00=np.concatenate([f32(x[:, :, 0, 0]) for x in d["dense"]]),
                   iou=cat("iou"), all_iou=cat("all_iou"))
        put("low_res", cat("low_res"), (2, 3), scale=8)  # whole: 256 KB per [SEG]
        put("image_pe", f32(d["image_pe"][0][0]), (1, 2))
        final = f32(masks[0])
        put("final_logits", final, (1, 2), scale=2)
        out.update(final_bits=np.packbits(final > 0, axis=-1), final_shape=np.array(final.shape))
    meta = {"image": image.name, "size": list(hd_src_size(image)), "query": query, "force": force,
            "forced_ids": forced, "reply": reply, "max_new_tokens": max_new, "dtype": dtype}
    return out, meta


def hd_src_size(path: Path) -> tuple:
    with Image.open(path) as im:
        return im.size


def git_head(src: Path) -> str:
    """The GeoPixel commit the arrays come from (read from its .git, no git binary needed)."""
    head = (src / ".git" / "HEAD").read_text().strip()
    if head.startswith("ref: "):
        ref = src / ".git" / head[5:]
        packed = src / ".git" / "packed-refs"
        if ref.exists():
            return ref.read_text().strip()
        return next(line.split()[0] for line in packed.read_text().splitlines() if line.endswith(head[5:]))
    return head


def tile_pngs(names: list, folder: Path) -> list:
    """The named tiles of geopixel_vision_reference.TILES (its pattern_tile) written as PNG files."""
    from geopixel_vision_reference import TILES, pattern_tile

    paths = []
    for name in names:
        paths.append(folder / f"{name}.png")
        Image.fromarray(pattern_tile(*TILES[name])).save(paths[-1])
    return paths


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geopixel-src", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--images", type=Path, nargs="*", default=[])
    ap.add_argument("--query", default="Describe the image, segmenting what you name.")
    ap.add_argument("--force-reply", action="append", default=[],
                    help="reply to teacher-force; once for all images or once per image")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="free runs; forced runs get len + 1")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--limit-kb", type=int, default=64, help="larger arrays are saved strided")
    ap.add_argument("--dump-keys", type=Path)
    ap.add_argument("--config", type=Path, help="config.json for --dump-keys without a checkpoint")
    ap.add_argument("--tiles", nargs="*", default=[], help="pattern tiles by name (geopixel_vision_reference)")
    a = ap.parse_args(argv)
    if a.dump_keys:
        cfg_file = a.config or a.checkpoint / "config.json"
        shapes = read_shapes(a.checkpoint) if a.checkpoint else {}
        dump_keys(a.geopixel_src, json.loads(cfg_file.read_text()), shapes, a.dump_keys)
        return 0
    import torch

    torch.manual_seed(0)
    model, tok, seg_id, arch = load(a.geopixel_src, a.checkpoint, a.dtype)
    tmp = tempfile.TemporaryDirectory()
    a.images = list(a.images) + tile_pngs(a.tiles, Path(tmp.name))
    arrays, metas = {}, []
    forces = a.force_reply * len(a.images) if len(a.force_reply) == 1 else a.force_reply
    for i, image in enumerate(a.images):
        runs = [("free", None, a.max_new_tokens)]
        if i < len(forces):
            n = len(tok(forces[i], add_special_tokens=False).input_ids) + 1
            runs.append(("forced", forces[i], n))
        for run, force, n in runs:
            out, meta = run_image(model, tok, seg_id, image, a.query, force, n, a.dtype, a.limit_kb * 1024,
                                  full=run == "forced" or not forces)
            # the dense PE does not depend on the image: kept once; the padded image is checked by its hash
            arrays.update({f"{i}.{run}.{k}": v for k, v in out.items()
                           if not (k.startswith("hd_image") or i and k.startswith("image_pe"))})
            metas.append(dict(meta, index=i, run=run))
            print(f"{image.name} {run}: {meta['reply']!r}", flush=True)
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(a.checkpoint.iterdir()) if f.is_file()}
    metas.append({"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                  "seg_id": seg_id, "len_tokenizer": len(tok), "checkpoint_sha256": files,
                  "geopixel_commit": git_head(a.geopixel_src), "arch": arch})
    arrays["meta"] = np.array(json.dumps(metas))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **arrays)
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
