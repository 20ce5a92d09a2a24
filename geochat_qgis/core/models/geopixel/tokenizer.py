"""GeoPixel's tokenizer: InternLM2's SentencePiece model with transformers 4.33's slow-tokenizer rules.

GeoPixel loads it with ``AutoTokenizer.from_pretrained(..., use_fast=False, trust_remote_code=True)``
under transformers 4.33.2 (InternLM2Tokenizer, a PreTrainedTokenizer over ``tokenizer.model``). This
module reproduces what that computes, on ``sentencepiece`` alone, from the same files:

- Special tokens come from ``tokenizer_config.json`` then ``special_tokens_map.json`` (which wins);
  a value given as an object is an AddedToken with its ``lstrip`` / ``rstrip`` flags.
- ``added_tokens.json`` ([SEG], <p>, </p>) numbers its tokens after the SentencePiece vocabulary (the
  ids must be consecutive); then every special token the SentencePiece vocabulary lacks (e.g.
  ``<|im_start|>`` in GeoPixel's special_tokens_map.json) is appended too, as 4.33's
  ``sanitize_special_tokens`` does.
- Encoding splits the text at every added and special token first (leftmost match). Around a plain
  token the neighbouring text loses its whitespace on both sides; around an AddedToken only on the
  sides its ``lstrip`` / ``rstrip`` say. Each remaining piece is encoded by SentencePiece on its own.
  ``[UNUSED_TOKEN_146]`` / ``[UNUSED_TOKEN_145]`` are SentencePiece user-defined pieces, not split out.
- ``add_special_tokens=True`` puts the SentencePiece BOS first (``add_bos_token``, default true).
- Decoding with ``skip_special_tokens=True`` drops the special ids; added tokens ([SEG], <p>, </p>)
  stay and are joined to the SentencePiece-decoded runs between them with single spaces; each run is
  passed through transformers' ``clean_up_tokenization`` (" ." -> ".", " 's" -> "'s", ...).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ...errors import ModelError
from .json_files import read_json_object

_SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")
_CLASS_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@dataclass(frozen=True)
class SpecialToken:
    """A special token's text and whether it eats the whitespace on its left / right."""

    content: str
    lstrip: bool = True
    rstrip: bool = True
    plain: bool = True  # a plain string: strips both sides (4.33's default branch)


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (the same replacements in the same order)."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


def _special(value) -> Optional[SpecialToken]:
    if value is None:
        return None
    if isinstance(value, dict):
        return SpecialToken(str(value["content"]), bool(value.get("lstrip", False)),
                            bool(value.get("rstrip", False)), plain=False)
    return SpecialToken(str(value))


def _read_json(path: Path) -> dict:
    return read_json_object(path, f"the tokenizer file {path.name}")


class InternLM2Tokenizer:
    """Encode / decode as GeoPixel's tokenizer does under transformers 4.33.2."""

    def __init__(self, folder: str | Path) -> None:
        import sentencepiece as spm

        folder = Path(folder)
        model = folder / "tokenizer.model"
        if not model.is_file():
            raise ModelError(f"{folder} has no tokenizer.model; download the model (with its tokenizer) again.")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model.read_bytes())
        except (OSError, RuntimeError) as exc:
            raise ModelError(f"{model} is not a SentencePiece model ({exc}); download the model again.") from exc
        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        smap = _read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}
        self.add_bos_token = bool(config.get("add_bos_token", True))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        specials: dict[str, object] = dict(_CLASS_DEFAULTS)
        for source in (config, smap):
            for key in _SPECIAL_ATTRIBUTES + ("additional_special_tokens",):
                if key in source:
                    value = source[key]
                    if isinstance(value, dict) and value.get("__type") == "AddedToken":
                        value = {k: v for k, v in value.items() if k != "__type"}
                    specials[key] = value
        extended: list[SpecialToken] = []
        for key in _SPECIAL_ATTRIBUTES:
            token = _special(specials.get(key))
            if token is not None and token not in extended:
                extended.append(token)
        for value in specials.get("additional_special_tokens") or []:
            token = _special(value)
            if token is not None and token not in extended:
                extended.append(token)
        self.special_tokens = list(dict.fromkeys(t.content for t in extended))
        self._flags = {t.content: t for t in extended if not t.plain}
        self.unk_token = str(_special(specials["unk_token"]).content)
        self.added: dict[str, int] = {}
        added_file = folder / "added_tokens.json"
        if added_file.is_file():
            for token, index in sorted(_read_json(added_file).items(), key=lambda item: item[1]):
                if index != len(self):
                    raise ModelError(f"added_tokens.json gives {token!r} the id {index}, but the next free id is "
                                     f"{len(self)}; the tokenizer files do not belong together.")
                self._add(token)
        for token in self.special_tokens:
            self._add(token)
        self.decoder = {index: token for token, index in self.added.items()}
        self.no_split = set(self.special_tokens) | set(self.added)
        longest_first = sorted(self.no_split, key=len, reverse=True)
        self._splitter = re.compile("|".join(re.escape(t) for t in longest_first)) if longest_first else None
        self.special_ids = {self.token_to_id(token) for token in self.special_tokens}

    def _add(self, token: str) -> None:
        """4.33's ``_add_tokens``: a token the vocabulary lacks (maps to unk) gets the next id."""
        unk = self.token_to_id(self.unk_token)
        if token != self.unk_token and token not in self.added and self.token_to_id(token) == unk:
            self.added[token] = len(self)

    def __len__(self) -> int:
        return self.sp.get_piece_size() + len(self.added)

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def token_to_id(self, token: str) -> int:
        """``convert_tokens_to_ids`` of one token: added tokens first, then the SentencePiece vocabulary."""
        if token in self.added:
            return self.added[token]
        return self.sp.piece_to_id(token)

    def _split(self, text: str) -> list[str]:
        """The text cut at every added / special token (leftmost match, longest at that place)."""
        if self._splitter is None:
            return [text]
        parts: list[str] = []
        start = 0
        for match in self._splitter.finditer(text):
            if match.start() > start:
                parts.append(text[start:match.start()])
            parts.append(match.group())
            start = match.end()
        if start < len(text):
            parts.append(text[start:])
        return parts

    def tokenize_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS / EOS."""
        tokens = self._split(text)
        names = self.no_split
        for i, token in enumerate(tokens):
            if token not in names:
                continue
            flags = self._flags.get(token, SpecialToken(token))
            if flags.rstrip and i + 1 < len(tokens) and tokens[i + 1]:
                tokens[i + 1] = tokens[i + 1].lstrip()
            if flags.lstrip and i > 0 and tokens[i - 1]:
                tokens[i - 1] = tokens[i - 1].rstrip()
        ids: list[int] = []
        for token in tokens:
            if not token:
                continue
            if token in names:
                ids.append(self.token_to_id(token))
            else:
                ids.extend(self.sp.encode(token))
        return ids

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """``tokenizer(text, add_special_tokens=add_bos).input_ids`` as 4.33 computes it (BOS first;
        an EOS last only where tokenizer_config.json sets ``add_eos_token``)."""
        ids = self.tokenize_ids(text)
        if add_bos:
            ids = ([self.bos_id] if self.add_bos_token else []) + ids
            ids = ids + ([self.eos_id] if self.add_eos_token else [])
        return ids

    def _piece(self, index: int) -> str:
        if index in self.decoder:
            return self.decoder[index]
        if not 0 <= index < self.sp.get_piece_size():
            raise ModelError(f"Token id {index} is outside the tokenizer's {len(self)} ids; the model and its "
                             "tokenizer files do not belong together.")
        return self.sp.id_to_piece(index)

    def _run_text(self, pieces: Sequence[str], skip_special_tokens: bool) -> str:
        """``convert_tokens_to_string`` of InternLM2Tokenizer for one run without added tokens."""
        out, current, prev_special = "", [], False
        for piece in pieces:
            if not skip_special_tokens and piece in self.special_tokens:
                if not prev_special:
                    out += " "
                out += self.sp.decode_pieces(current) + piece
                prev_special, current = True, []
            else:
                current.append(piece)
                prev_special = False
        out += self.sp.decode_pieces(current)
        return clean_up_tokenization(out)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """``tokenizer.decode(ids, skip_special_tokens=...)`` as 4.33 computes it."""
        texts: list[str] = []
        run: list[str] = []
        for index in (int(i) for i in ids):
            if skip_special_tokens and index in self.special_ids:
                continue
            piece = self._piece(index)
            if piece in self.added:
                if run:
                    texts.append(self._run_text(run, skip_special_tokens))
                    run = []
                texts.append(piece)
            else:
                run.append(piece)
        if run:
            texts.append(self._run_text(run, skip_special_tokens))
        text = " ".join(texts)
        return clean_up_tokenization(text) if self.clean_up_spaces else text


def load_tokenizer(folder: str | Path) -> InternLM2Tokenizer:
    """GeoPixel's tokenizer from a model folder (tokenizer.model and its JSON files)."""
    return InternLM2Tokenizer(folder)


# --- a tiny tokenizer in the published layout (for the tiny GeoPixel the project builds itself) ---

UNUSED_TOKENS = tuple(f"[UNUSED_TOKEN_{i}]" for i in range(141, 147))  # InternLM2's last six pieces
ADDED_TOKENS = ("[SEG]", "<p>", "</p>")
_AddedTokenDict = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
# GeoPixel-7B's special_tokens_map.json (as published on the Hub)
PUBLISHED_SPECIAL_TOKENS_MAP = {
    "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                  "<|interpreter|>", "<|plugin|>"],
    "bos_token": {"content": "<s>", **_AddedTokenDict},
    "eos_token": {"content": "</s>", **_AddedTokenDict},
    "pad_token": "<unk>",
    "unk_token": {"content": "<unk>", **_AddedTokenDict},
}
_WORDS = ("a an the of in on at to and with near next by from is are there this that image shows "
          "building buildings road roads tree trees car cars house houses river field fields water roof "
          "parking lot ship ships harbor bridge airport runway plane forest grass farmland residential area "
          "storage tank tanks left right top bottom center large small white red green gray dark "
          "segment segmentation mask masks describe provide thorough description please output "
          "interleaved corresponding phrases could you for user assistant").split()


def _tiny_corpus(seed: int, lines: int = 3000) -> list[str]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words[rng.randrange(len(words))] += rng.choice(".,?!:;'\"()0123456789")
        out.append(" ".join(words) + ("\n" if rng.random() < 0.2 else ""))
    return out


def _move_user_pieces_last(model: bytes) -> bytes:
    """Reorder the pieces so the user-defined [UNUSED_TOKEN_*] come last, as in InternLM2's vocabulary."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    user = [p for p in proto.pieces if p.piece in UNUSED_TOKENS]
    rest = [p for p in proto.pieces if p.piece not in UNUSED_TOKENS]
    reordered = [type(p)() for p in rest + user]
    for new, old in zip(reordered, rest + user):
        new.CopyFrom(old)
    del proto.pieces[:]
    proto.pieces.extend(reordered)
    return proto.SerializeToString()


def write_tiny_tokenizer(folder: str | Path, vocab_size: int = 512, seed: int = 0) -> int:
    """Train a tiny SentencePiece model offline and write GeoPixel's tokenizer files into ``folder``.

    Files: tokenizer.model (BPE, byte fallback, unk/bos/eos = 0/1/2, [UNUSED_TOKEN_141..146] as the
    last six user-defined pieces), tokenizer_config.json, special_tokens_map.json (GeoPixel-7B's),
    added_tokens.json ([SEG], <p>, </p> right after the SentencePiece vocabulary). The remote-code
    tokenizer class file is not written. Returns the vocabulary size the model's embeddings need
    (SentencePiece pieces + the three added tokens).
    """
    import io

    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus(seed)), model_writer=buffer, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=list(UNUSED_TOKENS),
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, num_threads=1, hard_vocab_limit=False,
        minloglevel=2)
    model = _move_user_pieces_last(buffer.getvalue())
    pieces = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    config = {
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656, "pad_token": "</s>", "padding_side": "right",
        "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>",
    }
    files = {
        "tokenizer_config.json": config,
        "special_tokens_map.json": PUBLISHED_SPECIAL_TOKENS_MAP,
        "added_tokens.json": {token: pieces + i for i, token in enumerate(ADDED_TOKENS)},
    }
    (folder / "tokenizer.model").write_bytes(model)
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return pieces + len(ADDED_TOKENS)
