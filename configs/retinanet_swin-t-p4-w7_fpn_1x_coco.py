# FP32 RetinaNet Swin-T 1x on COCO: mmdet's own config, unchanged. mmdet's
# model zoo has the config but no trained weights, so GPLQ's RetinaNet recipe
# starts by training it (ImageNet Swin-T from the Swin authors' release, 12
# epochs, batch 2 per GPU on 8 GPUs; not run here: no COCO, no GPU on the
# development machines). This file gives the run a work dir the stage-1
# config knows:
#   bash tools/dist_train.sh configs/retinanet_swin-t-p4-w7_fpn_1x_coco.py 8
#   -> work_dirs/retinanet_swin-t-p4-w7_fpn_1x_coco/epoch_12.pth
_base_ = 'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py'
custom_imports = dict(imports=['gplq_mmdet'], allow_failed_imports=False)
