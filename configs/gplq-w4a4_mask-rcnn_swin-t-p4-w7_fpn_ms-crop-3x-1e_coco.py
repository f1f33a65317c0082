# GPLQ stage 2 (W4A4) for mmdet's Mask R-CNN Swin-T 3x (multi-scale crop) on
# COCO: the weights of the stage-1 checkpoint quantized to 4 bits (per output
# channel, percentile clipping), then mmdet's COCO evaluation on val2017. Paper
# (box AP / mask AP, COCO val2017): FP32 46.0/41.6, W32A4 43.0/40.2, W4A4
# 40.1/38.9.
#   python tools/quantize.py configs/gplq-w4a4_mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x-1e_coco.py
# It writes, in work_dirs/gplq-w4a4_mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x-1e_coco/:
#   quantized_w4a4.pth (for tools/test.py) and results_w4a4.json.
# Another stage-1 checkpoint: pass it after the config.
_base_ = [
    './gplq-w32a4_mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x-1e_coco.py',
    './_base_/gplq-w4a4_stage2.py',
]
stage1_checkpoint = 'work_dirs/gplq-w32a4_mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x-1e_coco/epoch_1.pth'  # noqa
