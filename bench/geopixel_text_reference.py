"""Reference data for GeoPixel's language side, from GeoPixel's own code (decoder, tokenizer, prompt).

Runs in an environment of its own (transformers 4.33.2, torch, torchvision, einops, sentencepiece,
decord; see tests/data/geopixel/README.md) and imports GeoPixel from a source folder given as the
first argument (a clone of mbzuai-oryx/GeoPixel; nothing of it is in this repository). Writes:

- ``text_reference.npz``: a tiny InternLM2Model of GeoPixel's ``modeling_internlm2`` (eager
  attention, PLoRA rank patched to 16 so the file stays small; GeoPixel's alpha 256 is kept, so the
  LoRA scaling is 16), its weights under the checkpoint's names, and for random inputs: a forward
  (normed hidden states, float32 logits), the same with dynamic NTK active (sequence longer than
  max_position_embeddings), and greedy decoding done as transformers 4.33's ``generate`` does it
  for GeoPixel (no cache: the whole ``prompt + tokens`` each step, argmax of the last row) with and
  without NTK, keeping each step's logits and the last step's hidden states.
- ``tokenizer_reference.json``: GeoPixel's InternLM2Tokenizer (tokenization_internlm2.py) loaded
  from the tiny tokenizer folder as chat.py loads it (pad = unk): ids of many strings with and
  without special tokens, decodes of id lists, and prompts from GeoPixel's own
  ``interleav_wrap_chat`` (called with a stand-in ``self`` whose embedding returns the token id and
  whose image encoder returns -1 rows, so the layout is read back as ids).

    /path/to/ref-venv/bin/python bench/geopixel_text_reference.py GEOPIXEL_SRC \
        --tokenizer tests/data/geopixel/tiny_tokenizer --out-dir tests/data/geopixel
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0},
             rms_norm_eps=1e-5, bias=False)
VOCAB = 200
LORA_R = 16
PROMPT, IMAGE_ROWS, STEPS = 30, (1, 22), 20
MAX_POS = 64  # NTK inactive: every sequence here is shorter
NTK_MAX_POS = {"forward": 32, "greedy": 36}  # NTK active: forward of 40, greedy crosses 36 at step 7 of 20
FRAGMENTS = ["[SEG]", "<p>", "</p>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|plugin|>", "[UNUSED_TOKEN_145]",
             "[UNUSED_TOKEN_146]", "<ImageHere>", " ", "  ", "\n", "\t", " \n ", "building", "roof", "the", "a",
             "Road", "cars", ".", ",", "'s", " n't", "?", "!", "é", "中", "🙂", "0", "42", "<", ">", "[", "]",
             "p", "/", "user", "assistant", "segment", "mask"]


def _geopixel(src: Path):
    sys.path.insert(0, str(src))
    from model.IXC import build_mlp, modeling_internlm2
    from model.IXC.configuration_internlm_xcomposer2 import InternLMXcomposer2Config
    from model.IXC.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM
    from model.IXC.tokenization_internlm2 import InternLM2Tokenizer

    class SmallPLoRA(build_mlp.PLoRA):  # only the rank changes; GeoPixel's alpha (256) stays
        def __init__(self, *args, **kwargs):
            kwargs["lora_r"] = LORA_R
            super().__init__(*args, **kwargs)

    modeling_internlm2.PLoRA = SmallPLoRA
    return modeling_internlm2, InternLMXcomposer2Config, InternLMXComposer2ForCausalLM, InternLM2Tokenizer


def _models(src: Path, seed: int):
    import torch

    modeling, Config, _, _ = _geopixel(src)
    torch.manual_seed(seed)

    def build(max_pos: int, state=None):
        config = Config(vocab_size=VOCAB, max_position_embeddings=max_pos, attn_implementation="eager", **SIZES)
        model = modeling.InternLM2Model(config).eval()
        head = torch.nn.Linear(config.hidden_size, VOCAB, bias=False)
        if state is None:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    noise = torch.randn(param.shape, generator=gen)
                    param.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else noise * 0.1)
                head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.1)
        else:
            model.load_state_dict(state[0])
            head.load_state_dict(state[1])
        return model, head, config

    return build


def _run(model, head, embeds, im_mask):
    import torch

    n = embeds.shape[1]
    out = model(inputs_embeds=embeds, attention_mask=torch.ones(1, n, dtype=torch.long),
                position_ids=torch.arange(n)[None], use_cache=False, im_mask=im_mask, return_dict=True)
    hidden = out.last_hidden_state
    return hidden, head(hidden).float()


def _greedy(model, head, prompt, im_mask):
    """transformers 4.33 greedy_search for GeoPixel: no cache, the whole sequence every step."""
    import torch

    tokens, step_logits, hidden = [], [], None
    for _ in range(STEPS):
        ids = torch.tensor([tokens], dtype=torch.long)
        embeds = torch.cat([prompt, model.tok_embeddings(ids)], dim=1)
        mask = torch.cat([im_mask, torch.zeros(1, len(tokens), dtype=torch.bool)], dim=1)
        hidden, logits = _run(model, head, embeds, mask)
        step_logits.append(logits[0, -1])
        tokens.append(int(logits[0, -1].argmax()))
    return tokens, torch.stack(step_logits), hidden[0]


def decoder_reference(src: Path, out: Path, seed: int = 0) -> None:
    import torch

    build = _models(src, seed)
    model, head, config = build(MAX_POS)
    state = (model.state_dict(), head.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    arrays: dict[str, np.ndarray] = {}
    with torch.no_grad():
        embeds = torch.randn(1, 40, config.hidden_size, generator=gen)
        im_mask = torch.zeros(1, 40, dtype=torch.bool)
        im_mask[0, IMAGE_ROWS[0]:IMAGE_ROWS[1]] = True
        arrays["forward_embeds"], arrays["forward_im_mask"] = embeds.numpy(), im_mask.numpy()
        for case, max_pos in (("forward", MAX_POS), ("forward_ntk", NTK_MAX_POS["forward"])):
            m, h, _ = build(max_pos, state)
            hidden, logits = _run(m, h, embeds, im_mask)
            arrays[f"{case}_hidden"], arrays[f"{case}_logits"] = hidden[0].numpy(), logits[0].numpy()
        prompt, prompt_mask = embeds[:, :PROMPT], im_mask[:, :PROMPT]
        for case, max_pos in (("greedy", MAX_POS), ("greedy_ntk", NTK_MAX_POS["greedy"])):
            m, h, _ = build(max_pos, state)
            tokens, step_logits, last_hidden = _greedy(m, h, prompt, prompt_mask)
            arrays[f"{case}_tokens"] = np.array(tokens, dtype=np.int64)
            arrays[f"{case}_step_logits"] = step_logits.numpy()
            arrays[f"{case}_last_hidden"] = last_hidden.numpy()
    weights = {"model." + k: v for k, v in state[0].items() if "lora_" not in k or "Plora" in k}
    weights["output.weight"] = state[1]["weight"]
    for name, tensor in weights.items():
        arrays["weight:" + name] = tensor.numpy()
    hf_config = {"vocab_size": VOCAB, "max_position_embeddings": MAX_POS, **SIZES,
                 "ntk_max_position_embeddings": NTK_MAX_POS, "prompt_rows": PROMPT, "image_rows": IMAGE_ROWS}
    arrays["config_json"] = np.array(json.dumps(hf_config))
    np.savez_compressed(out, **arrays)


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12)))


class _PromptSelf:
    """Stands in for GeoPixel's model in interleav_wrap_chat: ids come back as embedding values."""

    def __init__(self, tokenizer, image_rows: int) -> None:
        import torch

        self.tokenizer = tokenizer
        self.device = "cpu"
        self.model = torch.nn.Module()
        self.model.tok_embeddings = torch.nn.Embedding(len(tokenizer), 1)
        with torch.no_grad():
            self.model.tok_embeddings.weight.copy_(torch.arange(len(tokenizer), dtype=torch.float32)[:, None])
        self.image_rows = image_rows

    def encode_img(self, image, hd_num):
        import torch

        return torch.full((1, self.image_rows, 1), -1.0)


def tokenizer_reference(src: Path, folder: Path, out: Path, seed: int = 0) -> None:
    import torch

    _, _, IXC, Tokenizer = _geopixel(src)
    tokenizer = Tokenizer.from_pretrained(str(folder), padding_side="right")
    tokenizer.pad_token = tokenizer.unk_token
    rng = random.Random(seed)
    texts = ["", " ", "\n", "hello", " hello", "hello ", "[SEG]", " [SEG] ", "a<p>b</p>c", "a <p> b </p> c",
             "<p><p></p></p>[SEG][SEG]", "x  [SEG]  y", "x\n[SEG]\ny", "<s>hi</s>", " <s> hi </s> ", "<unk> x",
             "<|im_start|>user\nq<|im_end|>\n", "[UNUSED_TOKEN_146]user\nWhat is here?[UNUSED_TOKEN_145]\n",
             "The <p> red roof </p> [SEG] is near the <p>road</p>[SEG].", "</p</p>>", "<<p>>", "[[SEG]]"]
    texts += [_random_text(rng) for _ in range(250)]
    encode = [{"text": t, "ids": tokenizer(t, add_special_tokens=False).input_ids,
               "ids_bos": tokenizer(t, add_special_tokens=True).input_ids} for t in texts]
    size = len(tokenizer)
    specials = sorted(set(tokenizer.all_special_ids))
    id_lists = [case["ids_bos"] + [tokenizer.eos_token_id] for case in encode[:120]]
    id_lists += [[rng.randrange(size) for _ in range(rng.randint(1, 20))] for _ in range(150)]
    id_lists += [[rng.choice(specials + list(range(size - 12, size))) for _ in range(rng.randint(1, 8))]
                 for _ in range(40)]
    decode = [{"ids": ids, "skip": tokenizer.decode(ids, skip_special_tokens=True),
               "keep": tokenizer.decode(ids, skip_special_tokens=False)} for ids in id_lists]
    prompts = []
    queries = ["Describe the image.", "Could you provide a segmentation mask for red car in this image?",
               "", " lead and trail ", "a [SEG] in the question", "image <ImageHere> inside",
               "two<ImageHere>a<ImageHere>b"]
    histories = [[], [("What is this?", "A <p> roof </p> [SEG].")], [("q1", "a1"), ("q2", "")]]
    fake = _PromptSelf(tokenizer, image_rows=5)
    for query in queries:
        for history in histories:
            for meta in ("", "Be brief."):
                inputs, im_mask, _ = IXC.interleav_wrap_chat(fake, query, ["image.png"], history=history,
                                                            meta_instruction=meta)
                rows = inputs["inputs_embeds"][0, :, 0].round().to(torch.int64).tolist()
                prompts.append({"query": query, "history": history, "meta": meta, "ids": rows,
                                "im_mask": im_mask[0].to(torch.int64).tolist()})
    data = {"len": size, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
            "special_ids": specials, "added": tokenizer.added_tokens_encoder,
            "encode": encode, "decode": decode, "prompts": prompts}
    out.write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("geopixel", type=Path, help="a GeoPixel source folder")
    parser.add_argument("--tokenizer", type=Path, required=True, help="the tiny tokenizer folder")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    decoder_reference(args.geopixel, args.out_dir / "text_reference.npz")
    tokenizer_reference(args.geopixel, args.tokenizer, args.out_dir / "tokenizer_reference.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
