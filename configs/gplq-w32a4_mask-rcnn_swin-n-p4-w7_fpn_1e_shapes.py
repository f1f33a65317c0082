# GPLQ stage 1 (W32A4) on the nano Swin shapes track: 4-bit activations,
# FP32 weights, one epoch from the FP32 checkpoint with the PCA mimic loss
# against the frozen FP32 teacher.
#   python tools/train.py configs/gplq-w32a4_mask-rcnn_swin-n-p4-w7_fpn_1e_shapes.py
# For another FP32 checkpoint override both places it is used:
#   --cfg-options load_from=PATH custom_hooks.1.teacher_checkpoint=PATH
_base_ = './mask-rcnn_swin-n-p4-w7_fpn_20e_shapes.py'

fp32_checkpoint = 'work_dirs/demo/fp32/epoch_20.pth'
load_from = fp32_checkpoint

quant_cfg = dict(
    a_bits=4,
    a_granularity='per_channel',
    attn_granularity='per_tensor',
    patch_embed_bits=8,
    scope='backbone')
model = dict(backbone=dict(type='QuantSwinTransformer', quant_cfg=quant_cfg))

# One epoch at a constant, tiny learning rate (METHOD.md: 5e-6 at batch 128,
# 1e-6 at batch 32 and below). The steps get their own rate (1e-3) and no
# weight decay: at 1e-6 they would barely move in one short epoch.
max_epochs = 1
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = []
optim_wrapper = dict(
    optimizer=dict(lr=1e-6),
    paramwise_cfg=dict(
        custom_keys={'_quantizer.step': dict(lr_mult=1000.0,
                                             decay_mult=0.0)}))
custom_hooks = [
    dict(type='ActQuantCalibrationHook', num_batches=8),
    dict(type='FeatureMimicHook', mode='pca', loss_weight=1.0,
         features='neck', teacher_checkpoint=fp32_checkpoint),
]
default_hooks = dict(checkpoint=dict(interval=1))
