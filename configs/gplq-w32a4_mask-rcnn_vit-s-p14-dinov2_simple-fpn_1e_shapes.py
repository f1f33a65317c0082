# GPLQ stage 1 (W32A4) on the DINOv2 ViT-S/14 shapes track: 4-bit
# activations in the ViT (every Linear input, q/k/v and softmax output; patch
# embedding input at 8 bits), FP32 weights (now trained, the ViT included),
# one epoch from the FP32 detector with the PCA mimic loss.
#   python tools/train.py configs/gplq-w32a4_mask-rcnn_vit-s-p14-dinov2_simple-fpn_1e_shapes.py
# For another FP32 checkpoint override both places it is used:
#   --cfg-options load_from=PATH custom_hooks.1.teacher_checkpoint=PATH
_base_ = './mask-rcnn_vit-s-p14-dinov2_simple-fpn_6e_shapes.py'

fp32_checkpoint = 'work_dirs/vit_fp32/epoch_6.pth'
load_from = fp32_checkpoint

quant_cfg = dict(
    a_bits=4,
    a_granularity='per_channel',
    attn_granularity='per_tensor',
    patch_embed_bits=8,
    scope='backbone')
model = dict(
    backbone=dict(
        type='QuantTimmViT', frozen=False, init_cfg=None,
        quant_cfg=quant_cfg))

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
