# GPLQ stage-2 settings (tools/quantize.py), shared by the gplq-w4a4 configs:
# 4-bit weights per output channel, each channel's clipping picked among
# percentiles by reconstruction error (METHOD.md, RepQ-ViT style), on 32
# calibration batches; no GPTQ, no QwT (the paper used QwT only for
# classification). Command-line flags of tools/quantize.py override these.
gplq_stage2 = dict(w_bits=4, method='percentile', gptq=False, qwt=False,
                   calib_batches=32)
