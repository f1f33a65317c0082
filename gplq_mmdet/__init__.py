"""GPLQ: 4-bit vision-transformer detectors for MMDetection 3.x.

Configs load the plugin with
``custom_imports = dict(imports=['gplq_mmdet'], allow_failed_imports=False)``.
Importing it registers the plugin's backbones and hooks into mmdet's
registries and routes mmengine's checkpoint loading through
:func:`gplq_mmdet.checkpoint.safe_load`.
"""
from .backbones import (
                        ActQuantDetector,
                        QuantSwinTransformer,
                        QuantTimmViT,
                        TimmViT,
)
from .checkpoint import register_safe_loader, safe_load
from .config import QuantConfig
from .guards import QuantGuardHook, ResumableEpochHook
from .hooks import ActQuantCalibrationHook, FeatureMimicHook
from .losses import PCAMimicLoss
from .quantizers import ActQuantizer
from .surgery import (
                        act_quant_disabled,
                        calibrate_act_quant,
                        iter_quantizers,
                        prepare_act_quant,
                        remove_act_quant,
                        set_act_quant,
)

__version__ = '0.1.0'

register_safe_loader()

__all__ = [
    'ActQuantCalibrationHook', 'ActQuantDetector', 'ActQuantizer',
    'FeatureMimicHook', 'PCAMimicLoss', 'QuantConfig', 'QuantGuardHook',
    'QuantSwinTransformer', 'QuantTimmViT', 'ResumableEpochHook', 'TimmViT',
    'act_quant_disabled', 'calibrate_act_quant',
    'iter_quantizers', 'prepare_act_quant', 'remove_act_quant', 'safe_load',
    'set_act_quant', '__version__'
]
