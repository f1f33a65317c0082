"""Weight PTQ core: clipping, GPTQ, packing."""
import pytest
import torch

from gplq_mmdet.ptq import (
    CLIP_METHODS,
    dequantize,
    fake_quant_rows,
    gptq_quantize,
    pack_int,
    quantize_weight,
    unpack_int,
    weight_scales,
)


def _heavy_tailed(out=64, inp=256, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(out, inp, generator=gen) * 0.02
    outliers = torch.rand(out, inp, generator=gen) < 0.002
    return torch.where(outliers, base * 40, base)


@pytest.mark.parametrize('bits', [3, 4, 6])
def test_clipping_methods_no_worse_than_minmax(bits):
    w = _heavy_tailed()
    errors = {}
    for method in CLIP_METHODS:
        ints, scale = quantize_weight(w, bits, method)
        errors[method] = (dequantize(ints, scale) - w).pow(2).sum(1)
    for method in ('percentile', 'mse'):
        assert (errors[method] <= errors['minmax'] + 1e-12).all()
    # On heavy tails the searches do better overall, not just as well.
    assert errors['mse'].sum() < errors['minmax'].sum()
    assert errors['percentile'].sum() < errors['minmax'].sum()


def test_minmax_scale_closed_form_and_zero_channel():
    w = torch.tensor([[0.7, -1.4, 0.0], [0.0, 0.0, 0.0]])
    scale = weight_scales(w, 4, 'minmax')
    assert scale[0].item() == pytest.approx(1.4 / 7)
    assert scale[1].item() == 1.0  # all-zero channel keeps a finite step
    ints, s = quantize_weight(w, 4, 'minmax')
    assert ints.tolist() == [[4, -7, 0], [0, 0, 0]]


@pytest.mark.parametrize('method', CLIP_METHODS)
def test_dequantized_equals_fake_quantized(method):
    w = _heavy_tailed(16, 3 * 3 * 8).reshape(16, 8, 3, 3)
    ints, scale = quantize_weight(w, 4, method)
    assert ints.dtype == torch.int8 and ints.shape == w.shape
    expected = fake_quant_rows(w.reshape(16, -1), scale, 4).reshape(w.shape)
    torch.testing.assert_close(dequantize(ints, scale), expected, atol=0,
                               rtol=0)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    gen = torch.Generator().manual_seed(1)
    inp, out, n = 64, 32, 2048
    # Correlated features: 16 latent factors plus a little noise.
    x = (torch.randn(n, 16, generator=gen) @ torch.randn(16, inp,
                                                         generator=gen)
         + 0.1 * torch.randn(n, inp, generator=gen))
    w = torch.randn(out, inp, generator=gen) * 0.05
    hessian = 2 * x.T @ x / n
    rtn_ints, rtn_scale = quantize_weight(w, 4, 'minmax')
    g_ints, g_scale = gptq_quantize(w, hessian, 4, 'minmax', block_size=16)
    torch.testing.assert_close(g_scale, rtn_scale)
    ref = x @ w.T
    rtn_err = (x @ dequantize(rtn_ints, rtn_scale).T - ref).pow(2).mean()
    gptq_err = (x @ dequantize(g_ints, g_scale).T - ref).pow(2).mean()
    assert gptq_err < 0.5 * rtn_err
    assert g_ints.min() >= -8 and g_ints.max() <= 7


@pytest.mark.parametrize('bits', range(2, 9))
def test_pack_unpack_round_trip_every_bit_width(bits):
    gen = torch.Generator().manual_seed(bits)
    lo, hi = -(2**(bits - 1)), 2**(bits - 1) - 1
    ints = torch.randint(lo, hi + 1, (7, 13), generator=gen).to(torch.int8)
    ints[0, 0], ints[0, 1] = lo, hi
    packed = pack_int(ints, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-ints.numel() * bits // 8)
    assert torch.equal(unpack_int(packed, bits, ints.shape), ints)


def test_four_bit_packing_is_two_values_per_byte():
    ints = torch.tensor([-8, 7, 0, 1], dtype=torch.int8)
    packed = pack_int(ints, 4)
    # codes = value + 8: 0, 15, 8, 9; low nibble first.
    assert packed.tolist() == [0 | 15 << 4, 8 | 9 << 4]


def test_bad_input():
    with pytest.raises(ValueError, match='w_bits=9 is out of range'):
        weight_scales(torch.ones(2, 2), 9)
    with pytest.raises(ValueError, match="'l1' is unknown"):
        weight_scales(torch.ones(2, 2), 4, 'l1')
    with pytest.raises(ValueError, match='outside the 4-bit range'):
        pack_int(torch.tensor([8]), 4)
    with pytest.raises(ValueError, match='expected 2'):
        unpack_int(torch.zeros(3, dtype=torch.uint8), 4, (4,))
    with pytest.raises(ValueError, match='does not match'):
        gptq_quantize(torch.ones(2, 3), torch.eye(4))
