# GPLQ stage 1 (W32A4) on the nano Swin shapes track: 4-bit activations,
# FP32 weights, one epoch from the FP32 checkpoint with the PCA mimic loss
# against the frozen FP32 teacher.
#   python tools/train.py configs/gplq-w32a4_mask-rcnn_swin-n-p4-w7_fpn_1e_shapes.py
# For another FP32 checkpoint override both places it is used:
#   --cfg-options load_from=PATH custom_hooks.1.teacher_checkpoint=PATH
_base_ = [
    './mask-rcnn_swin-n-p4-w7_fpn_20e_shapes.py',
    './_base_/gplq-w32a4_stage1.py',
]
fp32_checkpoint = 'work_dirs/demo/fp32/epoch_20.pth'
load_from = fp32_checkpoint
model = dict(
    backbone=dict(
        type='QuantSwinTransformer', quant_cfg={{_base_.gplq_quant_cfg}}))

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
