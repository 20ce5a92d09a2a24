"""Evaluating a prompt of text and image embeddings in llama.cpp, reusing what is evaluated.

A prompt is a list of segments: token ids, or an image's embedding rows (``llama_batch`` with
``embd``, llama-cpp-python's low-level API). Image positions are recorded in ``Llama.input_ids``
as a negative id unique to the tile, so the longest prefix shared with what the context already
holds (the same tile's system text and image, earlier chat turns) is kept in the KV cache and
only the rest is evaluated. llama-cpp-python's own ``generate`` then samples from there: it sees
the whole prompt cached.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..errors import BackendError


@dataclass
class ImageSegment:
    key: str  # which tile (its pixel digest)
    rows: np.ndarray  # (n, n_embd) float32

    @property
    def token_id(self) -> int:
        """The negative id standing for this image's positions in ``input_ids``."""
        return -1 - (int(self.key[:8], 16) & 0x3FFFFFFF)


Segment = Union[list[int], ImageSegment]


def segment_ids(segments: Sequence[Segment]) -> list[int]:
    """The ids the prompt occupies in ``input_ids`` (image rows as their negative id)."""
    ids: list[int] = []
    for segment in segments:
        if isinstance(segment, ImageSegment):
            ids.extend([segment.token_id] * len(segment.rows))
        else:
            ids.extend(segment)
    return ids


def common_prefix(a: np.ndarray, b: Sequence[int]) -> int:
    """Length of the shared prefix of two id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n], dtype=a.dtype))
    return int(differ[0]) if differ.size else n


class PromptEvaluator:
    """Evaluates segments into one ``Llama`` (sequence 0), keeping the shared prefix."""

    def __init__(self, llama) -> None:
        import llama_cpp

        self.llama = llama
        self.n_embd = llama.n_embd()
        self.n_batch = llama.n_batch
        self._batch = llama_cpp.llama_batch_init(self.n_batch, self.n_embd, 1)
        self.evaluated = 0  # positions evaluated by the last call (for tests and benchmarks)

    def close(self) -> None:
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    def forget(self) -> None:
        """Drop everything evaluated (the next prompt starts fresh)."""
        self.llama.reset()
        self.llama._ctx.kv_cache_seq_rm(-1, 0, -1)

    def evaluate(self, segments: Sequence[Segment],
                 check: Optional[Callable[[], None]] = None) -> list[int]:
        """Make the context hold exactly ``segments`` with the last position's logits ready;
        returns the prompt's ids. ``check`` runs between batches (cancel)."""
        llama = self.llama
        ids = segment_ids(segments)
        if len(ids) >= llama.n_ctx():
            raise BackendError(f"the prompt has {len(ids)} tokens, more than the context "
                               f"({llama.n_ctx()}): shorten the conversation")
        keep = common_prefix(llama.input_ids[: llama.n_tokens], ids)
        if keep == len(ids) == llama.n_tokens and not llama._requires_eval:
            self.evaluated = 0
            return ids
        keep = min(keep, len(ids) - 1)  # the last position is evaluated again for its logits
        if not llama._ctx.kv_cache_seq_rm(-1, keep, -1):
            self.forget()
            keep = 0
        llama.n_tokens = keep
        self.evaluated = len(ids) - keep
        position = 0
        for segment in segments:
            size = len(segment.rows) if isinstance(segment, ImageSegment) else len(segment)
            start = max(0, keep - position)
            if start < size:
                if isinstance(segment, ImageSegment):
                    self._eval_rows(segment, start, check)
                else:
                    self._eval_tokens(segment[start:], check)
            position += size
        return ids

    def _eval_tokens(self, tokens: list[int], check) -> None:
        for i in range(0, len(tokens), self.n_batch):
            if check is not None:
                check()
            try:
                self.llama.eval(tokens[i:i + self.n_batch])
            except RuntimeError as exc:
                raise BackendError(f"llama.cpp could not evaluate the prompt ({exc})") from exc

    def _eval_rows(self, image: ImageSegment, start: int, check) -> None:
        import llama_cpp

        llama, batch = self.llama, self._batch
        rows = np.ascontiguousarray(image.rows[start:], dtype=np.float32)
        if rows.shape[1] != self.n_embd:
            raise BackendError(f"image embeddings are {rows.shape[1]} wide, the text model "
                               f"takes {self.n_embd}: the mmproj does not belong to this model")
        for i in range(0, len(rows), self.n_batch):
            if check is not None:
                check()
            chunk = rows[i:i + self.n_batch]
            n, first = len(chunk), llama.n_tokens
            ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
            batch.n_tokens = n
            np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = np.arange(first, first + n)
            np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
            np.ctypeslib.as_array(batch.logits, shape=(n,))[:] = 0
            batch.logits[n - 1] = 1
            for j in range(n):
                batch.seq_id[j][0] = 0
            status = llama_cpp.llama_decode(llama.ctx, batch)
            if status != 0:
                raise BackendError(f"llama.cpp could not evaluate the image (llama_decode "
                                   f"returned {status})")
            llama.input_ids[first:first + n] = image.token_id
            llama.n_tokens = first + n
            llama._requires_eval = False

    def last_logits(self) -> np.ndarray:
        """The logits after the last evaluated position (a copy)."""
        import llama_cpp

        vocab = self.llama.n_vocab()
        pointer = llama_cpp.llama_get_logits_ith(self.llama.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(vocab,)).copy()
