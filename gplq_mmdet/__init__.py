"""GPLQ: 4-bit vision-transformer detectors for MMDetection 3.x.

Configs load the plugin with
``custom_imports = dict(imports=['gplq_mmdet'], allow_failed_imports=False)``.
Importing it routes mmengine's checkpoint loading through
:func:`gplq_mmdet.checkpoint.safe_load`.
"""
from .checkpoint import register_safe_loader, safe_load

__version__ = '0.1.0'

register_safe_loader()

__all__ = ['safe_load', '__version__']
