"""Attention blocks with quantized matmul operands.

Surgery swaps an attention module's class for one of these subclasses in
place (parameters and their state_dict keys stay as they are) and adds four
quantizers: ``q_quantizer`` and ``k_quantizer`` before ``q @ k^T``,
``attn_quantizer`` (the softmax output) and ``v_quantizer`` before
``attn @ v``. While every quantizer is disabled the original forward runs,
so outputs are bit-identical to the FP32 module; otherwise the explicit
matmul path runs, never timm's fused scaled-dot-product kernel, which would
bypass the quantizers.
"""
from __future__ import annotations

import torch
from mmdet.models.backbones.swin import WindowMSA
from timm.layers.attention import (
    Attention,
    maybe_add_mask,
    resolve_self_attn_mask,
)

from .quantizers import ActQuantizer

MATMUL_QUANTIZERS = ('q_quantizer', 'k_quantizer', 'attn_quantizer',
                     'v_quantizer')


class _QuantMatmulMixin:
    def _quant_active(self) -> bool:
        return any(
            bool(getattr(self, n).enabled) or getattr(self, n).calibrating
            for n in MATMUL_QUANTIZERS)


class QuantWindowMSA(_QuantMatmulMixin, WindowMSA):
    """mmdet's Swin window attention (with relative position bias and the
    shifted-window mask) with quantized matmul operands."""

    q_quantizer: ActQuantizer
    k_quantizer: ActQuantizer
    attn_quantizer: ActQuantizer
    v_quantizer: ActQuantizer

    def forward(self, x: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self._quant_active():
            return super().forward(x, mask)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads,
                                  C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = self.q_quantizer(q * self.scale)
        k = self.k_quantizer(k)
        attn = q @ k.transpose(-2, -1)
        wh_ww = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[
            self.relative_position_index.view(-1)].view(wh_ww, wh_ww, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(B // nw, nw, self.num_heads, N,
                             N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        attn = self.attn_quantizer(attn)
        v = self.v_quantizer(v)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class QuantTimmAttention(_QuantMatmulMixin, Attention):
    """timm's ViT attention (DeiT, DINOv2, ...) with quantized operands."""

    q_quantizer: ActQuantizer
    k_quantizer: ActQuantizer
    attn_quantizer: ActQuantizer
    v_quantizer: ActQuantizer

    def forward(self, x: torch.Tensor,
                attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if not self._quant_active():
            return super().forward(x, attn_mask, is_causal)
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads,
                                  self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = self.q_quantizer(q * self.scale)
        k = self.k_quantizer(k)
        attn = q @ k.transpose(-2, -1)
        attn = maybe_add_mask(
            attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1))
        attn = self.attn_quantizer(attn)
        x = attn @ self.v_quantizer(v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


#: Exact attention class -> its quantized subclass and the head width.
QUANT_ATTENTION = {
    WindowMSA: QuantWindowMSA,
    Attention: QuantTimmAttention,
}


def head_dim(module: torch.nn.Module) -> int:
    if isinstance(module, WindowMSA):
        return module.embed_dims // module.num_heads
    return module.head_dim
