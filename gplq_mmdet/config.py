"""``QuantConfig``: the quantization settings a config file carries as
``quant_cfg = dict(...)``, validated with messages that say how to fix them.
Plain Python; no mmdet import."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .quantizers import GRANULARITIES, check_bits, check_granularity

#: ``backbone``: transformer backbone only (the paper's detection layout).
#: ``all``: also the input of every Conv2d/Linear of the neck and heads.
SCOPES = ('backbone', 'all')


@dataclass(frozen=True)
class QuantConfig:
    """Stage-1 activation quantization layout.

    Attributes:
        a_bits: bits of every Linear input in the backbone (and of neck/head
            Conv2d/Linear inputs with ``scope='all'``).
        a_granularity: granularity of those inputs: ``per_channel``
            (default, the paper's), ``per_tensor`` or ``per_token``.
        attn_bits: bits of the attention matmul operands (q, k, v and the
            softmax output); ``None`` means ``a_bits``.
        attn_granularity: granularity of q, k and v. The softmax output is
            always per tensor (unsigned): its last dimension is the token
            count, which changes with the image size.
        patch_embed_bits: bits of the patch-embedding input (per tensor).
        scope: ``backbone`` or ``all`` (see ``SCOPES``).
        quantize_attention: quantize the attention matmul operands.
        w_bits: ``None`` (GPLQ stage 1: weights stay FP32 until stage 2).
            An integer makes this the full-QAT baseline: the weights of
            every act-quantized layer are fake-quantized too, with a learned
            LSQ step per output channel, from the first iteration (the
            patch embedding at ``patch_embed_bits``).
    """

    a_bits: int = 4
    a_granularity: str = 'per_channel'
    attn_bits: int | None = None
    attn_granularity: str = 'per_tensor'
    patch_embed_bits: int = 8
    scope: str = 'backbone'
    quantize_attention: bool = True
    w_bits: int | None = None

    def __post_init__(self) -> None:
        check_bits(self.a_bits, 'a_bits')
        if self.attn_bits is not None:
            check_bits(self.attn_bits, 'attn_bits')
        check_bits(self.patch_embed_bits, 'patch_embed_bits')
        if self.w_bits is not None:
            check_bits(self.w_bits, 'w_bits')
        check_granularity(self.a_granularity, 'a_granularity')
        check_granularity(self.attn_granularity, 'attn_granularity')
        if self.scope not in SCOPES:
            raise ValueError(f'scope={self.scope!r} is unknown: use '
                             f'{" or ".join(map(repr, SCOPES))}')

    @property
    def matmul_bits(self) -> int:
        return self.a_bits if self.attn_bits is None else self.attn_bits

    @classmethod
    def from_dict(cls, cfg: QuantConfig | dict[str, Any] | None
                  ) -> QuantConfig:
        """Accept a ``QuantConfig``, a plain dict (as in an mmengine config,
        where it may carry a ``type`` key) or ``None`` for the defaults."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        if not isinstance(cfg, dict):
            raise TypeError(f'quant_cfg must be a dict, got {type(cfg)}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known - {'type'})
        if unknown:
            raise ValueError(
                f'unknown quant_cfg key(s) {", ".join(unknown)}; valid keys: '
                f'{", ".join(sorted(known))}')
        return cls(**{k: v for k, v in cfg.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ['QuantConfig', 'SCOPES', 'GRANULARITIES']
