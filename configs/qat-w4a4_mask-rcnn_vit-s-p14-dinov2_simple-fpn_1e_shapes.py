# Full-QAT baseline (W4A4) on the DINOv2 ViT-S/14 shapes track, for
# comparison with GPLQ: the GPLQ stage-1 recipe (same layers, loss,
# optimizer and epoch) but with the weights fake-quantized by learned LSQ
# steps from the first iteration, instead of quantized after training.
#   python tools/train.py configs/qat-w4a4_mask-rcnn_vit-s-p14-dinov2_simple-fpn_1e_shapes.py
#   python tools/test.py configs/qat-w4a4_mask-rcnn_vit-s-p14-dinov2_simple-fpn_1e_shapes.py CKPT
# At 5x the budget: --cfg-options train_cfg.max_epochs=5
_base_ = './gplq-w32a4_mask-rcnn_vit-s-p14-dinov2_simple-fpn_1e_shapes.py'
model = dict(backbone=dict(quant_cfg=dict(w_bits=4)))
optim_wrapper = {{_base_.gplq_qat_optim_wrapper}}
