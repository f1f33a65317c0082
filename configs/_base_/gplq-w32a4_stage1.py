# GPLQ stage-1 settings shared by the stage-1 configs. Combined with an mmdet
# base config, so every name here is new to mmdet (``gplq_*``); a stage-1
# config assigns them to ``optim_wrapper``, ``custom_hooks``, ... itself.

# 4-bit activations: every Linear input of the backbone per channel, the
# attention matmul operands per tensor, the patch-embedding input at 8 bits.
gplq_quant_cfg = dict(
    a_bits=4,
    a_granularity='per_channel',
    attn_granularity='per_tensor',
    patch_embed_bits=8,
    scope='backbone')

# One epoch of AdamW at a constant, tiny learning rate (METHOD.md: 5e-6 at
# batch 128, 2.5e-6 at 64, 1e-6 at 32 and below), whatever optimizer the FP32
# model was trained with (mmdet's RetinaNet uses SGD). The steps get their
# own rate (1e-3) and no weight decay: at 1e-6 they would barely move in one
# epoch. Norms and position tables get no weight decay, as in mmdet's Swin
# recipes (its RetinaNet recipe, SGD, has no such groups).
gplq_lr = 1e-6
gplq_optimizer = dict(_delete_=True, type='AdamW', lr=gplq_lr,
                      betas=(0.9, 0.999), weight_decay=0.05)
gplq_step_options = dict(lr_mult=1000.0, decay_mult=0.0)
gplq_calibration_batches = 8

# The stage-1 schedule as a stage-1 config assigns it:
#   train_cfg = {{_base_.gplq_train_cfg}}, and so on.
gplq_train_cfg = dict(max_epochs=1, val_interval=1)
gplq_no_decay = dict(decay_mult=0.0)
gplq_optim_wrapper = dict(
    optimizer=gplq_optimizer,
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': gplq_no_decay,
            'relative_position_bias_table': gplq_no_decay,
            'norm': gplq_no_decay,
            '_quantizer.step': gplq_step_options,
        }))
gplq_default_hooks = dict(checkpoint=dict(interval=1))
# mmdet's COCO recipes train with 2 images per GPU; the paper's stage 1 used
# 1 per GPU (8 GPUs: total batch 8, lr 1e-6). --auto-scale-lr scales the
# rate linearly from that total.
gplq_auto_scale_lr = dict(enable=False, base_batch_size=8)

# Stage 1 is one long epoch: a resume point every 500 iterations
# (ResumableEpochHook), and a fixed seed so a resumed run sees the rest of
# the epoch in the same order.
gplq_resume_interval = 500
randomness = dict(seed=0)

# The full-QAT baseline (qat-w4a4_* configs): the same layout with the
# weights fake-quantized from the start (quant_cfg.w_bits). Their LSQ steps
# are a few hundredths, so they learn at 10x the weight rate, not 1000x.
gplq_qat_weight_step_options = dict(lr_mult=10.0, decay_mult=0.0)
gplq_qat_optim_wrapper = dict(
    optimizer=gplq_optimizer,
    paramwise_cfg=dict(
        custom_keys={
            '_quantizer.step': gplq_step_options,
            'weight_quantizer.step': gplq_qat_weight_step_options,
        }))
