"""GeoPixel's language model: InternLM2 with Partial LoRA, in torch (SDPA attention, a KV cache).

Computes what GeoPixel's ``model/IXC/modeling_internlm2.py`` computes in ``infer_mode='base'``:
interleaved ``wqkv`` ("b q (h gs d)": per KV head, ``groups`` query heads then its key and its
value), grouped-query attention, rotate-half RoPE (``rope_theta``; ``rope_scaling`` dynamic NTK or
linear as GeoPixel implements them), RMSNorm computed in float32 then cast back and scaled, SiLU-gated
feed forward, final norm and the ``output`` head (logits returned in float32). Partial LoRA adds
``Plora_B(Plora_A(x)) * alpha / r`` on the rows where ``im_mask`` is set (the image rows) and nowhere
else; GeoPixel hard-codes alpha = 256 (scaling 1.0 at r = 256). The dead adapters ``lora_sft``,
``lora_dpo`` and ``lora_web`` are never created.

Parameter names = the checkpoint's names with ``model.`` removed, ``output.weight`` kept:
``model.tok_embeddings.weight`` -> ``tok_embeddings.weight``, ``model.layers.N.attention.wqkv.weight``
-> ``layers.N.attention.wqkv.weight`` (and ``.Plora_A.weight``, ``.Plora_B.weight``, ``.bias`` when
``bias``), the same for ``attention.wo``, ``feed_forward.w1/w2/w3``, ``attention_norm``, ``ffn_norm``,
``model.norm.weight`` -> ``norm.weight``, ``output.weight`` -> ``output.weight``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...cancel import CancelToken
from ...errors import ModelError
from .kv_cache import KVCache

GEOPIXEL_LORA_ALPHA = 256  # PLoRA(..., lora_alpha=256) in GeoPixel's InternLM2Attention / InternLM2MLP
TEXT_PREFIXES = ("model.tok_embeddings.", "model.layers.", "model.norm.", "output.")
DEAD_ADAPTERS = ("lora_sft_", "lora_dpo_", "lora_web_")


@dataclass(frozen=True)
class InternLM2Config:
    """The decoder's sizes (from config.json and the checkpoint's tensor shapes)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    lora_r: int
    lora_alpha: float = GEOPIXEL_LORA_ALPHA
    rope_theta: float = 10000.0
    rope_scaling_type: Optional[str] = None  # None, "dynamic" or "linear"
    rope_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_r

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(f"InternLM2 sizes do not fit: hidden {self.hidden_size}, heads "
                             f"{self.num_attention_heads}, KV heads {self.num_key_value_heads}; check config.json.")
        if self.rope_scaling_type not in (None, "dynamic", "linear"):
            raise ModelError(f"config.json rope_scaling type {self.rope_scaling_type!r} is not one GeoPixel "
                             "knows (dynamic, linear); fix config.json.")

    @classmethod
    def from_checkpoint(cls, hf_config: Mapping, shapes: Mapping[str, tuple]) -> "InternLM2Config":
        """Sizes from the tensors (full checkpoint names), the rest from config.json."""
        def shape(name: str) -> tuple:
            if name not in shapes:
                raise ModelError(f"The checkpoint has no tensor {name}: not a GeoPixel checkpoint, or an "
                                 "incomplete download; download it again.")
            return tuple(shapes[name])

        vocab, hidden = shape("model.tok_embeddings.weight")
        layers = 0
        while f"model.layers.{layers}.attention.wqkv.weight" in shapes:
            layers += 1
        if layers == 0:
            raise ModelError("The checkpoint has no decoder layers (model.layers.0.attention.wqkv.weight); "
                             "download it again.")
        for key in ("num_attention_heads", "num_key_value_heads"):
            if key not in hf_config:
                raise ModelError(f"config.json has no {key}; use the config.json published with the weights.")
        scaling = hf_config.get("rope_scaling") or None
        if scaling is not None and not isinstance(scaling, Mapping):
            raise ModelError(f"config.json rope_scaling must be an object, got {scaling!r}.")
        config = cls(
            vocab_size=vocab, hidden_size=hidden,
            intermediate_size=shape("model.layers.0.feed_forward.w1.weight")[0],
            num_hidden_layers=layers,
            num_attention_heads=int(hf_config["num_attention_heads"]),
            num_key_value_heads=int(hf_config["num_key_value_heads"]),
            lora_r=shape("model.layers.0.attention.wqkv.Plora_A.weight")[0],
            rope_theta=float(hf_config.get("rope_theta", 10000.0)),
            rope_scaling_type=None if scaling is None else scaling.get("type"),
            rope_scaling_factor=1.0 if scaling is None else float(scaling.get("factor", 1.0)),
            rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf_config.get("max_position_embeddings", 2048)),
            bias="model.layers.0.attention.wqkv.bias" in shapes)
        qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
        found = shape("model.layers.0.attention.wqkv.weight")
        if found != (qkv, hidden):
            raise ModelError(f"model.layers.0.attention.wqkv.weight is {found}, config.json's heads say "
                             f"({qkv}, {hidden}); the config does not match the weights.")
        return config

    def rope_base(self, seq_len: int) -> float:
        """The RoPE base GeoPixel uses for a forward over ``seq_len`` positions (past included)."""
        if self.rope_scaling_type == "dynamic" and seq_len > self.max_position_embeddings:
            factor = self.rope_scaling_factor
            ratio = factor * seq_len / self.max_position_embeddings - (factor - 1)
            return self.rope_theta * ratio ** (self.head_dim / (self.head_dim - 2))
        return self.rope_theta


def rope_cos_sin(config: InternLM2Config, positions: torch.Tensor, seq_len: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + (head_dim,), computed in float32 then cast to ``dtype``."""
    dim = config.head_dim
    base = config.rope_base(seq_len)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    t = positions.float()
    if config.rope_scaling_type == "linear":
        t = t / config.rope_scaling_factor
    freqs = t[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class PLoRALinear(nn.Module):
    """A linear layer plus the Partial LoRA delta on the image rows only."""

    def __init__(self, n_in: int, n_out: int, bias: bool, r: int, scaling: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None
        self.Plora_A = nn.Linear(n_in, r, bias=False)
        self.Plora_B = nn.Linear(r, n_out, bias=False)
        self.scaling = scaling

    def forward(self, x: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
        """``x`` (n, n_in) flattened rows; ``rows`` the indices of the image rows (or None)."""
        out = F.linear(x, self.weight, self.bias)
        if rows is not None and rows.numel():
            delta = self.Plora_B(self.Plora_A(x.index_select(0, rows))) * self.scaling
            out = out.index_add(0, rows, delta)
        return out


class Attention(nn.Module):
    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        c = config
        self.config = c
        qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        self.wqkv = PLoRALinear(c.hidden_size, qkv, c.bias, c.lora_r, c.lora_scaling)
        self.wo = PLoRALinear(c.num_attention_heads * c.head_dim, c.hidden_size, c.bias, c.lora_r, c.lora_scaling)

    def forward(self, x: torch.Tensor, rows: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                layer: int, cache: Optional[KVCache], mask: Optional[torch.Tensor]) -> torch.Tensor:
        c = self.config
        b, s, _ = x.shape
        qkv = self.wqkv(x.reshape(b * s, -1), rows).view(b, s, c.num_key_value_heads, c.groups + 2, c.head_dim)
        q = qkv[..., :c.groups, :].reshape(b, s, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # (b, 1, s, d)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(layer, k, v)
        if s == 1 and c.groups > 1:
            # one new token sees every cached key: the query heads of a KV head become its "rows"
            folded = q.reshape(b, c.num_key_value_heads, c.groups, c.head_dim)
            out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
            out = out.reshape(b, c.num_attention_heads, 1, c.head_dim)
        else:
            if c.groups > 1:
                k = k[:, :, None].expand(-1, -1, c.groups, -1, -1).reshape(b, c.num_attention_heads, -1, c.head_dim)
                v = v[:, :, None].expand(-1, -1, c.groups, -1, -1).reshape(b, c.num_attention_heads, -1, c.head_dim)
            if mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1 and past == 0)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b * s, c.hidden_size)
        return self.wo(out, rows).view(b, s, c.hidden_size)


class FeedForward(nn.Module):
    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        c = config
        self.w1 = PLoRALinear(c.hidden_size, c.intermediate_size, False, c.lora_r, c.lora_scaling)
        self.w3 = PLoRALinear(c.hidden_size, c.intermediate_size, False, c.lora_r, c.lora_scaling)
        self.w2 = PLoRALinear(c.intermediate_size, c.hidden_size, False, c.lora_r, c.lora_scaling)

    def forward(self, x: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        return self.w2(F.silu(self.w1(flat, rows)) * self.w3(flat, rows), rows).view(b, s, h)


class DecoderLayer(nn.Module):
    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class InternLM2Decoder(nn.Module):
    """Embeddings, decoder layers, final norm and the ``output`` head."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(token_ids)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``capacity`` positions."""
        c = self.config
        weight = self.tok_embeddings.weight
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, capacity, c.head_dim,
                       weight.dtype, weight.device)

    def forward(self, embeds: torch.Tensor, im_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, valid: Optional[torch.Tensor] = None,
                cancel: Optional[CancelToken] = None) -> torch.Tensor:
        """Normed last-layer hidden states (b, s, hidden) of ``embeds`` (b, s, hidden).

        ``im_mask`` (b, s) bool marks the image rows (Partial LoRA). ``cache`` holds the earlier
        positions and receives these. ``valid`` (b, past + s) bool marks real positions when
        sequences are left-padded to one length; positions then count real tokens only, as
        GeoPixel's ``cumsum(attention_mask) - 1`` does. ``cancel`` is checked before every layer (a
        4,000-token prompt takes minutes on a CPU).
        """
        b, s, _ = embeds.shape
        past = 0 if cache is None else cache.length
        total = past + s
        if valid is None:
            positions = torch.arange(past, total, device=embeds.device).expand(b, s)
            mask = None
        else:
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            mask = _padded_causal_mask(valid, s)
        if past and s > 1 and mask is None:
            mask = torch.ones(s, total, dtype=torch.bool, device=embeds.device).tril(past)
        if cache is not None and past and self.config.rope_base(total) != cache.rope_base:
            raise ModelError("The RoPE base changed (dynamic NTK past max_position_embeddings): the cached "
                             "keys no longer apply; run the whole sequence without a cache.")
        if cache is not None:
            cache.rope_base = self.config.rope_base(total)
        cos, sin = rope_cos_sin(self.config, positions, total, embeds.dtype)
        rows = None
        if im_mask is not None and bool(im_mask.any()):
            rows = im_mask.reshape(-1).nonzero().squeeze(1)
        h = embeds
        for index, layer in enumerate(self.layers):
            if cancel is not None:
                cancel.raise_if_cancelled()
            h = h + layer.attention(layer.attention_norm(h), rows, cos, sin, index, cache, mask)
            h = h + layer.feed_forward(layer.ffn_norm(h), rows)
        if cache is not None:
            cache.advance(s)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``output(hidden)`` in float32, as GeoPixel returns it."""
        return self.output(hidden).float()


def _padded_causal_mask(valid: torch.Tensor, s: int) -> torch.Tensor:
    """(b, 1, s, total) bool: causal, padded keys hidden, each query sees itself (no empty rows)."""
    total = valid.shape[1]
    past = total - s
    causal = torch.ones(s, total, dtype=torch.bool, device=valid.device).tril(past)
    mask = causal[None] & valid[:, None, :]
    own = torch.arange(s, device=valid.device) + past
    mask[:, torch.arange(s, device=valid.device), own] = True
    return mask[:, None]


def random_init(decoder: InternLM2Decoder, seed: int = 0, std: float = 0.02) -> InternLM2Decoder:
    """GeoPixel's ``_init_weights``: every weight normal(0, std), biases 0, norms 1 (LoRA included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return decoder


def build_decoder(config: InternLM2Config, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> InternLM2Decoder:
    """The decoder with uninitialised weights (``device='meta'`` allocates nothing)."""
    with torch.device(device):
        decoder = InternLM2Decoder(config)
    return decoder.to(dtype=dtype).eval().requires_grad_(False)


def checkpoint_name_to_param(name: str) -> Optional[str]:
    """The decoder parameter for a full checkpoint name; None for names of other parts."""
    if name.startswith("output."):
        return name
    if name.startswith(TEXT_PREFIXES):
        return name[len("model."):]
    return None


def load_state(decoder: InternLM2Decoder, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy the text part of a checkpoint (full names) into ``decoder``; the dead adapters are skipped.

    Unknown, missing or mis-shaped tensors are a ModelError naming the tensor.
    """
    params = dict(decoder.named_parameters())
    seen = set()
    for name in tensors:
        target = checkpoint_name_to_param(name)
        if target is None or any(dead in name for dead in DEAD_ADAPTERS):
            continue  # never read
        tensor = tensors[name]
        if target not in params:
            raise ModelError(f"Checkpoint tensor {name} has no place in GeoPixel's decoder; the checkpoint "
                             "is not in GeoPixel's layout.")
        param = params[target]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ModelError(f"Checkpoint tensor {name} has shape {tuple(tensor.shape)}, the decoder expects "
                             f"{tuple(param.shape)}; config.json does not match the weights.")
        with torch.no_grad():
            if param.is_meta:
                setattr_param(decoder, target, tensor.to(param.dtype))
            else:
                param.copy_(tensor)
        seen.add(target)
    missing = sorted(set(params) - seen)
    if missing:
        raise ModelError(f"The checkpoint lacks {len(missing)} decoder tensors, e.g. "
                         f"{checkpoint_param_name(missing[0])}; download it again.")


def checkpoint_param_name(param: str) -> str:
    """The checkpoint name of a decoder parameter."""
    return param if param.startswith("output.") else "model." + param


def setattr_param(module: nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    """Replace a meta parameter by ``tensor`` (kept as is: no copy, same dtype and device)."""
    owner_name, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))
