"""GeoChat's vocabulary as its loader builds it, and its ``llava_v1`` chat template in Jinja.

GeoChat's tokenizer is Llama's SentencePiece model plus the tokens its loader adds
(``<im_patch>`` when ``mm_use_im_patch_token``, ``<im_start>``/``<im_end>`` when
``mm_use_im_start_end``). A standard LLaVA checkpoint also needs an ``<image>`` token for the
image placeholder: it goes last. Rows the checkpoint lacks are filled with the mean of the saved
rows, so such a token's output logit is the mean of the others and never wins greedy decoding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from ..families.llava_v1 import IMAGE_TOKEN, SYSTEM

TOKENIZER_MODEL = "tokenizer.model"
LLAMA_CPP_MEDIA_MARKER = "<__media__>"  # mtmd_default_marker()

# The llava_v1 conversation (geochat/conversation.py) as a chat template: identical text to
# core/families/llava_v1.llava_v1_prompt for the same turns.
LLAVA_V1_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = " + json.dumps(SYSTEM) + " -%}{%- endif -%}"
    "{{- system -}}{{- ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}"
    "{{- '" + IMAGE_TOKEN + "\\n' -}}{%- endfor -%}"
    # llama.cpp's MTMD chat handler (llama_cpp.server --chat_format mtmd) passes each image as a
    # text item holding its media marker: it takes the place of "<image>", so "\n" follows it.
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- if item['text'] == '" + LLAMA_CPP_MEDIA_MARKER + "' -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}{{- ' ASSISTANT:' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] if item['type'] == 'text' -%}"
    "{{- item['text'] -}}{%- endfor -%}{%- endif -%}{{- '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# The converted HF folder's template: BOS first, as GeoChat's prompt starts. vLLM's chat endpoint
# tokenises the rendered template without adding special tokens, so the template must carry <s>
# itself (transformers' apply_chat_template then adds none either). The GGUF keeps
# LLAVA_V1_CHAT_TEMPLATE: llama.cpp adds BOS when it tokenises (add_bos_token); llama-server
# would strip a rendered leading BOS and llama-cpp-python renders ``bos_token`` as '', so one
# BOS either way (tests/unit/test_backend_http_server.py counts the tokens).
HF_CHAT_TEMPLATE = "{{- bos_token -}}" + LLAVA_V1_CHAT_TEMPLATE


@dataclass(frozen=True)
class Vocabulary:
    """The converted vocabulary: SentencePiece pieces, then added tokens, then ``<image>``."""

    sp_model: Path
    pieces: list[str]
    scores: list[float]
    kinds: list[int]  # SentencePiece piece types: 1 normal, 2 unknown, 3 control, 4 user, 6 byte
    added: list[str]  # tokens after the SentencePiece vocabulary, ``<image>`` last

    @property
    def size(self) -> int:
        return len(self.pieces) + len(self.added)

    @property
    def image_token_id(self) -> int:
        return self.size - 1


def _saved_added_tokens(folder: Path, sp_size: int) -> list[str]:
    """Tokens a checkpoint's tokenizer files already add after the SentencePiece vocabulary."""
    by_id: dict[int, str] = {}
    added_json = folder / "added_tokens.json"
    if added_json.is_file():
        by_id.update({int(i): t for t, i in json.loads(added_json.read_text(encoding="utf-8")).items()})
    config = folder / "tokenizer_config.json"
    if config.is_file():
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        by_id.update({int(i): entry["content"] for i, entry in decoder.items()})
    extra = {i: t for i, t in by_id.items() if i >= sp_size}
    if sorted(extra) != list(range(sp_size, sp_size + len(extra))):
        raise ModelError(f"Added tokens in {folder} do not follow the SentencePiece vocabulary; "
                         "the tokenizer files are inconsistent.")
    return [extra[i] for i in sorted(extra)]


def geochat_vocabulary(folder: Path, loader_tokens: list[str]) -> Vocabulary:
    """The vocabulary GeoChat's loader builds from ``folder``, plus ``<image>``."""
    import sentencepiece as spm

    sp_model = Path(folder) / TOKENIZER_MODEL
    if not sp_model.is_file():
        raise ModelError(f"{folder} has no {TOKENIZER_MODEL} (GeoChat's Llama tokenizer); download it again.")
    proc = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = proc.get_piece_size()
    pieces = [proc.id_to_piece(i) for i in range(n)]
    scores = [proc.get_score(i) for i in range(n)]
    kinds = [
        2 if proc.is_unknown(i) else 3 if proc.is_control(i) else 6 if proc.is_byte(i)
        else 5 if proc.is_unused(i) else 1
        for i in range(n)
    ]
    added = _saved_added_tokens(Path(folder), n)
    for token in [*loader_tokens, IMAGE_TOKEN]:
        if token not in added and token not in pieces:
            added.append(token)
    if added[-1] != IMAGE_TOKEN:
        raise ModelError(f"{folder} already defines {IMAGE_TOKEN} as a token; cannot place the image token.")
    return Vocabulary(sp_model, pieces, scores, kinds, added)
