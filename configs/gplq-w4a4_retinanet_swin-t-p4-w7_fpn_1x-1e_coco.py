# GPLQ stage 2 (W4A4) for mmdet's RetinaNet Swin-T 1x on COCO: the weights of
# the stage-1 checkpoint quantized to 4 bits (per output channel, percentile
# clipping), then mmdet's COCO evaluation on val2017. The paper reports no
# number for this model.
#   python tools/quantize.py configs/gplq-w4a4_retinanet_swin-t-p4-w7_fpn_1x-1e_coco.py
# writes
# work_dirs/gplq-w4a4_retinanet_swin-t-p4-w7_fpn_1x-1e_coco/quantized_w4a4.pth
# and results_w4a4.json. Another stage-1 checkpoint: pass it after the config.
_base_ = [
    './gplq-w32a4_retinanet_swin-t-p4-w7_fpn_1x-1e_coco.py',
    './_base_/gplq-w4a4_stage2.py',
]
stage1_checkpoint = 'work_dirs/gplq-w32a4_retinanet_swin-t-p4-w7_fpn_1x-1e_coco/epoch_1.pth'  # noqa
