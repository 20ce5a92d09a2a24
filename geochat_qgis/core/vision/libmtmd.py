"""Image embeddings as the installed llama.cpp's libmtmd computes them (llama_cpp.mtmd_cpp)."""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import numpy as np

from ..llama_library import route_mtmd_logs
from .preprocess import tile_rgb


class MtmdEncoder:
    """A libmtmd context for ``mmproj`` attached to a loaded llama_model (``Llama.model``)."""

    def __init__(self, model, mmproj: str | Path, n_embd: int, n_threads: int = 1,
                 use_gpu: bool = False, flash_attn: Optional[bool] = None,
                 warmup: bool = True) -> None:
        """``flash_attn`` None: libmtmd's default (auto); ``warmup`` False: no warm-up encode
        at its largest image size (buffers are sized on the first image instead)."""
        import llama_cpp
        from llama_cpp import mtmd_cpp as mtmd

        route_mtmd_logs()  # quiet unless llama-cpp-python is verbose
        self.mtmd, self.n_embd = mtmd, n_embd
        params = mtmd.mtmd_context_params_default()
        params.use_gpu, params.print_timings, params.n_threads = use_gpu, False, n_threads
        params.warmup = warmup
        if flash_attn is not None:
            params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), model, params)
        if not self.ctx:
            raise RuntimeError(f"libmtmd could not load {Path(mmproj).name}")

    def close(self) -> None:
        if self.ctx:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None

    def embed(self, image: np.ndarray) -> np.ndarray:
        """(n, n_embd) embeddings for the RGB uint8 ``image``; raises RuntimeError (BackendError
        for an array that is not one: libmtmd would read width x height x 3 bytes of it)."""
        mtmd = self.mtmd
        data = tile_rgb(image)
        height, width = data.shape[:2]
        bitmap = mtmd.mtmd_bitmap_init(width, height,
                                       (ctypes.c_uint8 * data.size).from_buffer_copy(data))
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            text = mtmd.mtmd_input_text()
            marker = mtmd.mtmd_default_marker()
            text.text, text.text_len = marker, len(marker)
            text.add_special, text.parse_special = False, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise RuntimeError("libmtmd could not tokenize the image")
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    if mtmd.mtmd_encode_chunk(self.ctx, chunk) != 0:
                        raise RuntimeError("libmtmd could not encode the image")
                    flat = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self.ctx),
                                                 shape=(n * self.n_embd,))
                    return flat.reshape(n, self.n_embd).copy()
            raise RuntimeError("libmtmd made no image chunk")
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)


def mtmd_embeddings(model, mmproj: str | Path, image: np.ndarray, n_embd: int,
                    n_threads: int = 1, use_gpu: bool = False, **params) -> np.ndarray:
    """One image through a fresh libmtmd context (see :class:`MtmdEncoder`)."""
    encoder = MtmdEncoder(model, mmproj, n_embd, n_threads, use_gpu, **params)
    try:
        return encoder.embed(image)
    finally:
        encoder.close()
