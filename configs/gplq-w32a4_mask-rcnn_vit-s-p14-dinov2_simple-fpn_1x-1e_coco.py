# GPLQ stage 1 (W32A4) for a ViTDet-style Mask R-CNN on the timm DINOv2
# ViT-S/14 on COCO: activations at 4 bits in the ViT, FP32 weights, one epoch
# of train2017 from the FP32 checkpoint with the PCA mimic loss on the FPN
# levels, AdamW at a constant lr 1e-6 for batch 1 per GPU on 8 GPUs
# (--auto-scale-lr for other totals). The paper reports no number for this
# model. Not run here (no COCO, no GPU on the development machines); the config
# is built, loaded and run one iteration on generated data by the tests.
#   bash tools/dist_train.sh configs/gplq-w32a4_mask-rcnn_vit-s-p14-dinov2_simple-fpn_1x-1e_coco.py 8
# then stage 2 and COCO evaluation:
#   python tools/quantize.py configs/gplq-w4a4_mask-rcnn_vit-s-p14-dinov2_simple-fpn_1x-1e_coco.py
_base_ = [
    './mask-rcnn_vit-s-p14-dinov2_simple-fpn_1x_coco.py',
    './_base_/gplq-w32a4_stage1.py',
]
custom_imports = dict(imports=['gplq_mmdet'], allow_failed_imports=False)
# FP32 model: none exists in any model zoo (mmdet's ViTDet uses its own ViT
# code and MAE weights). Train it first (12 epochs, 8 GPUs):
#   bash tools/dist_train.sh configs/mask-rcnn_vit-s-p14-dinov2_simple-fpn_1x_coco.py 8
# which writes the file below; or point this at your own checkpoint.
fp32_checkpoint = 'work_dirs/mask-rcnn_vit-s-p14-dinov2_simple-fpn_1x_coco/epoch_12.pth'  # noqa
load_from = fp32_checkpoint
model = dict(
    backbone=dict(
        type='QuantTimmViT',
        init_cfg=None,
        quant_cfg={{_base_.gplq_quant_cfg}}))

train_dataloader = dict(batch_size=1, num_workers=2)
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
auto_scale_lr = {{_base_.gplq_auto_scale_lr}}
