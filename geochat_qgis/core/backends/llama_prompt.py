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
        #: the key of each image the context holds, by its first position: two tiles whose
        #: negative ids collide never share their KV cache (the ids alone are 30 bits)
        self._images: dict[int, str] = {}

    def close(self) -> None:
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    def forget(self) -> None:
        """Drop everything evaluated (the next prompt starts fresh)."""
        self.llama.reset()
        self.llama._ctx.kv_cache_seq_rm(-1, 0, -1)
        self._images.clear()

    def evaluate(self, segments: Sequence[Segment],
                 check: Optional[Callable[[], None]] = None) -> list[int]:
        """Make the context hold exactly ``segments`` with the last position's logits ready;
        returns the prompt's ids. ``check`` runs between batches (cancel)."""
        llama = self.llama
        ids = segment_ids(segments)
        if len(ids) >= llama.n_ctx():
            raise BackendError(self._too_long(segments, len(ids)))
        keep = self._verified(segments, common_prefix(llama.input_ids[: llama.n_tokens], ids))
        self._images = {start: key for start, key in self._images.items() if start < keep}
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
                    self._images[position] = segment.key
                    self._eval_rows(segment, start, check)
                else:
                    self._eval_tokens(segment[start:], check)
            position += size
        return ids

    def _verified(self, segments: Sequence[Segment], keep: int) -> int:
        """``keep`` cut to the first image whose positions hold another image's KV cache (its
        id matches, its key does not)."""
        position = 0
        for segment in segments:
            if position >= keep:
                break
            if isinstance(segment, ImageSegment):
                if self._images.get(position) != segment.key:
                    return position
                position += len(segment.rows)
            else:
                position += len(segment)
        return keep

    def _too_long(self, segments: Sequence[Segment], n_ids: int) -> str:
        n_ctx = self.llama.n_ctx()
        image = sum(len(s.rows) for s in segments if isinstance(s, ImageSegment))
        first = len(segments[0]) if segments and not isinstance(segments[0], ImageSegment) else 0
        if image + first + 16 >= n_ctx:  # the image alone does not leave room for a question
            return (f"the prompt has {n_ids} tokens ({image} of them the image) and the context "
                    f"holds {n_ctx}: raise the context size (n_ctx) to at least {n_ids + 256}")
        return (f"the prompt has {n_ids} tokens ({image} of them the image), more than the "
                f"context holds ({n_ctx}): start a new conversation or shorten it, or raise the "
                "context size (n_ctx)")

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
            if status != 0:  # n_tokens and input_ids still describe what the context holds
                hint = ("no room left in the KV cache: raise the context size (n_ctx)"
                        if status == 1 else "try again; if it persists, reinstall llama.cpp")
                raise BackendError(f"llama.cpp could not evaluate the image (llama_decode "
                                   f"returned {status}): {hint}")
            llama.input_ids[first:first + n] = image.token_id
            llama.n_tokens = first + n
            llama._requires_eval = False

    def last_logits(self) -> np.ndarray:
        """The logits after the last evaluated position (a copy)."""
        import llama_cpp

        vocab = self.llama.n_vocab()
        pointer = llama_cpp.llama_get_logits_ith(self.llama.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(vocab,)).copy()
