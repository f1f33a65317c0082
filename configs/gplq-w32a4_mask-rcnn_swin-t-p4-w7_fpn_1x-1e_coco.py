# GPLQ stage 1 (W32A4) for mmdet's Mask R-CNN Swin-T 1x on COCO (the paper's
# detection table, METHOD.md): activations at 4 bits in the Swin backbone,
# FP32 weights, one epoch of train2017 from the model-zoo FP32 checkpoint,
# batch 1 per GPU (8 GPUs: lr 1e-6), PCA mimic loss on the FPN levels.
# Not run here (no COCO, no GPU on the development machines).
#   bash tools/dist_train.sh configs/gplq-w32a4_mask-rcnn_swin-t-p4-w7_fpn_1e_coco.py 8
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
    './_base_/gplq-w32a4_stage1.py',
]
custom_imports = dict(imports=['gplq_mmdet'], allow_failed_imports=False)
# mmdet model zoo; replace with a local path if you have the file.
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
auto_scale_lr = dict(enable=False, base_batch_size=8)
