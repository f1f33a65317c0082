# GPLQ stage 1 (W32A4) for mmdet's Mask R-CNN Swin-T 1x on COCO: activations at
# 4 bits in the Swin backbone, FP32 weights, one epoch of train2017 from the
# FP32 checkpoint with the PCA mimic loss on the FPN levels, AdamW at a
# constant lr 1e-6 for batch 1 per GPU on 8 GPUs (--auto-scale-lr for other
# totals). Paper (box AP / mask AP, COCO val2017): FP32 42.6/39.3, W32A4
# 39.7/38.1, W4A4 37.9/36.8. Not run here (no COCO, no GPU on the development
# machines); the config is built, loaded and run one iteration on generated
# data by the tests.
#   bash tools/dist_train.sh configs/gplq-w32a4_mask-rcnn_swin-t-p4-w7_fpn_1x-1e_coco.py 8
# then stage 2 and COCO evaluation:
#   python tools/quantize.py configs/gplq-w4a4_mask-rcnn_swin-t-p4-w7_fpn_1x-1e_coco.py
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
    './_base_/gplq-w32a4_stage1.py',
]
custom_imports = dict(imports=['gplq_mmdet'], allow_failed_imports=False)
# FP32 model: mmdet's model zoo (box AP 42.7, mask AP 39.3). Replace with a
# local path if you have the file.
fp32_checkpoint = 'https://download.openmmlab.com/mmdetection/v2.0/swin/mask_rcnn_swin-t-p4-w7_fpn_1x_coco/mask_rcnn_swin-t-p4-w7_fpn_1x_coco_20210902_120937-9d6b7cfa.pth'  # noqa
load_from = fp32_checkpoint
model = dict(
    backbone=dict(
        type='QuantSwinTransformer',
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
