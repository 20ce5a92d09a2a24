"""Decoding after an evaluated prompt: sampling token by token (the cancel token checked between
tokens), stop strings, the token limit and a GBNF grammar."""
from __future__ import annotations

import codecs
from functools import lru_cache
from typing import Optional, Sequence

from ..errors import BackendError
from .base import GenerateOptions


def decode(llama, prompt: list[int], index: int, options: GenerateOptions) -> tuple[str, int, str]:
    """Sample after the evaluated ``prompt`` until end of generation, a stop string, the token
    limit or a cancel; returns (text, tokens generated, finish reason)."""
    import llama_cpp

    if options.temperature > 0:
        llama.set_seed(options.seed)
    vocab = llama._model.vocab
    limit = min(options.max_new_tokens, llama.n_ctx() - len(prompt))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    text = ""
    count = 0
    finish = "length"
    tokens = llama.generate(prompt, temp=options.temperature, repeat_penalty=1.0,
                            grammar=compiled_grammar(options.grammar), reset=True)
    try:
        for token in tokens:
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            count += 1
            piece = decoder.decode(llama.detokenize([token]))
            if piece:
                text += piece
                if options.on_token is not None:
                    options.on_token(index, piece)
            cut = stop_index(text, options.stop, len(piece))
            if cut >= 0:
                text, finish = text[:cut], "stop"
                break
            if options.cancel is not None and options.cancel.cancelled:
                options.check_cancel()
            if count >= limit:
                break
    except RuntimeError as exc:  # llama_decode failed; n_tokens/input_ids stay consistent
        raise BackendError(f"llama.cpp failed while writing the answer ({exc}): try again; if "
                           "it persists, raise the context size (n_ctx)") from exc
    finally:
        tokens.close()
    return text + decoder.decode(b"", final=True), count, finish


def stop_index(text: str, stop: Sequence[str], new: int) -> int:
    """Where the first stop string in the tail of ``text`` starts (only the tail can be new)."""
    for word in stop:
        if word:
            at = text.find(word, max(0, len(text) - new - len(word)))
            if at >= 0:
                return at
    return -1


@lru_cache(maxsize=8)
def compiled_grammar(text: Optional[str]):
    """A compiled LlamaGrammar for GBNF ``text`` (cached: jobs reuse one grammar per task)."""
    if not text:
        return None
    from llama_cpp import LlamaGrammar

    try:
        return LlamaGrammar.from_string(text, verbose=False)
    except ValueError as exc:
        raise BackendError(f"The GBNF grammar does not parse: {exc}") from exc
