# GPLQ stage 1 (W32A4) on the DINOv2 ViT-S/14 shapes track: 4-bit
# activations in the ViT (every Linear input, q/k/v and softmax output; patch
# embedding input at 8 bits), FP32 weights (now trained, the ViT included),
# one epoch from the FP32 detector with the PCA mimic loss.
#   python tools/train.py configs/gplq-w32a4_mask-rcnn_vit-s-p14-dinov2_simple-fpn_1e_shapes.py
# For another FP32 checkpoint override both places it is used:
#   --cfg-options load_from=PATH custom_hooks.1.teacher_checkpoint=PATH
_base_ = [
    './mask-rcnn_vit-s-p14-dinov2_simple-fpn_6e_shapes.py',
    './_base_/gplq-w32a4_stage1.py',
]
fp32_checkpoint = 'work_dirs/vit_fp32/epoch_6.pth'
load_from = fp32_checkpoint
model = dict(
    backbone=dict(
        type='QuantTimmViT',
        frozen=False,
        init_cfg=None,
        quant_cfg={{_base_.gplq_quant_cfg}}))

train_cfg = {{_base_.gplq_train_cfg}}
param_scheduler = []
optim_wrapper = {{_base_.gplq_optim_wrapper}}
custom_hooks = [
    dict(type='ActQuantCalibrationHook',
         num_batches={{_base_.gplq_calibration_batches}}),
    dict(type='FeatureMimicHook', mode='pca', loss_weight=1.0,
         features='neck', teacher_checkpoint=fp32_checkpoint),
    dict(type='QuantGuardHook'),
    dict(type='ResumableEpochHook',
         interval={{_base_.gplq_resume_interval}}),
]
default_hooks = {{_base_.gplq_default_hooks}}
