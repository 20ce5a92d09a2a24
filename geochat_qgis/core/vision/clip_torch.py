"""The same computation as :mod:`clip_numpy` in torch, for a CUDA GPU (float32, no TF32)."""
from __future__ import annotations

import numpy as np

from .clip_numpy import patchify
from .mmproj import ClipVision


class TorchClip:
    """The mmproj's weights moved once to ``device``; :meth:`encode` as clip_numpy.encode."""

    def __init__(self, vision: ClipVision, device: str) -> None:
        import torch

        self.torch = torch
        self.vision = vision
        self.device = device

        def put(array: np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(array)).to(device)

        def pair(weights):
            return put(weights[0]), put(weights[1])

        self.class_embd, self.patch, self.position = (put(vision.class_embd), put(vision.patch),
                                                      put(vision.position))
        self.pre_ln, self.mm0, self.mm2 = pair(vision.pre_ln), pair(vision.mm0), pair(vision.mm2)
        self.layers = [tuple(pair(getattr(layer, name)) for name in
                             ("ln1", "qkv", "out", "ln2", "up", "down"))
                       for layer in vision.layers]

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        import torch.nn.functional as F

        vision = self.vision
        d, heads, eps = vision.hidden, vision.heads, vision.eps
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.inference_mode():
                rows = torch.from_numpy(patchify(np.asarray(pixels, np.float32),
                                                 vision.patch_size)).to(self.device)
                x = torch.cat([self.class_embd[None], rows @ self.patch]) + self.position
                x = F.layer_norm(x, (d,), *self.pre_ln, eps=eps)
                n = x.shape[0]
                for ln1, qkv, out, ln2, up, down in self.layers:
                    h = F.layer_norm(x, (d,), *ln1, eps=eps) @ qkv[0] + qkv[1]
                    q, k, v = h.reshape(n, 3, heads, d // heads).permute(1, 2, 0, 3)
                    mixed = F.scaled_dot_product_attention(q, k, v)
                    x = x + (mixed.transpose(0, 1).reshape(n, d) @ out[0] + out[1])
                    h = F.layer_norm(x, (d,), *ln2, eps=eps) @ up[0] + up[1]
                    h = h * torch.sigmoid(1.702 * h) if vision.quick_gelu else F.gelu(h)
                    x = x + (h @ down[0] + down[1])
                y = F.gelu(x[1:] @ self.mm0[0] + self.mm0[1]) @ self.mm2[0] + self.mm2[1]
                return y.float().cpu().numpy()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
