"""ActQuantizer numerics against torch's reference ops and closed forms."""
import math

import pytest
import torch

from gplq_mmdet.observers import CalibrationError
from gplq_mmdet.quantizers import ActQuantizer, quant_range


def _set_step(q: ActQuantizer, step) -> None:
    with torch.no_grad():
        q.step.copy_(torch.as_tensor(step, dtype=torch.float32))


@pytest.mark.parametrize('bits', [2, 3, 4, 8])
@pytest.mark.parametrize('signed', [True, False])
def test_per_tensor_forward_equals_torch_reference(bits, signed):
    torch.manual_seed(bits)
    x = torch.randn(4, 7, 16) * 3
    q = ActQuantizer(bits, 'per_tensor', signed=signed)
    _set_step(q, [0.173])
    qmin, qmax = quant_range(bits, signed)
    ref = torch.fake_quantize_per_tensor_affine(x, 0.173, 0, qmin, qmax)
    torch.testing.assert_close(q(x), ref, atol=0, rtol=0)
    levels = torch.unique(torch.round(q(x) / 0.173))
    assert levels.min() >= qmin and levels.max() <= qmax
    assert len(levels) <= 2**bits


def test_per_channel_forward_equals_torch_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6)
    steps = torch.linspace(0.05, 0.6, 6)
    q = ActQuantizer(4, 'per_channel', num_channels=6)
    _set_step(q, steps)
    ref = torch.fake_quantize_per_channel_affine(
        x, steps, torch.zeros(6, dtype=torch.int32), 2, -8, 7)
    torch.testing.assert_close(q(x), ref, atol=0, rtol=0)
    # NCHW convolution input: channels in dim 1.
    conv_in = torch.randn(2, 6, 4, 4)
    qc = ActQuantizer(4, 'per_channel', num_channels=6, channel_dim=1)
    _set_step(qc, steps)
    ref = torch.fake_quantize_per_channel_affine(
        conv_in, steps, torch.zeros(6, dtype=torch.int32), 1, -8, 7)
    torch.testing.assert_close(qc(conv_in), ref, atol=0, rtol=0)


def test_closed_form_rounding_and_clipping():
    q = ActQuantizer(4, 'per_tensor')
    _set_step(q, [0.5])
    x = torch.tensor([-10.0, -4.0, -0.75, -0.25, 0.25, 0.75, 1.3, 3.5, 10.0])
    # round half to even, then clamp to [-8, 7], times the step.
    expected = torch.tensor([-4.0, -4.0, -1.0, -0.0, 0.0, 1.0, 1.5, 3.5,
                             3.5])
    torch.testing.assert_close(q(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize('granularity', ['per_tensor', 'per_channel'])
def test_lsq_gradients_match_closed_form(granularity):
    torch.manual_seed(1)
    channels = 8
    x = (torch.randn(6, channels) * 2).requires_grad_()
    q = ActQuantizer(4, granularity, num_channels=channels)
    step = (torch.rand(channels) * 0.3 + 0.1 if granularity == 'per_channel'
            else torch.tensor([0.21]))
    _set_step(q, step)
    upstream = torch.randn(6, channels)
    (q(x) * upstream).sum().backward()

    qmin, qmax = -8, 7
    s = step.expand(6, channels) if granularity == 'per_channel' else step
    v = x.detach() / s
    r = torch.round(v)
    inside = (r >= qmin) & (r <= qmax)
    torch.testing.assert_close(x.grad, upstream * inside.float())
    dstep = torch.where(inside, r - v,
                        torch.where(r < qmin, torch.tensor(float(qmin)),
                                    torch.tensor(float(qmax))))
    n = x.numel() / q.step.numel()
    lsq_scale = 1 / math.sqrt(n * qmax)
    expected = (dstep * upstream * lsq_scale)
    expected = (expected.sum(0) if granularity == 'per_channel'
                else expected.sum().reshape(1))
    torch.testing.assert_close(q.step.grad, expected, rtol=1e-5, atol=1e-6)


def test_gradient_passes_half_a_step_beyond_the_clip_range():
    """The convention at the boundary: the input gradient is 1 while
    round(x/s) is still in range, which reaches q_max + 0.5 steps."""
    q = ActQuantizer(4, 'per_tensor')
    _set_step(q, [1.0])
    x = torch.tensor([7.4, 7.6, -8.4, -8.6], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_per_token_uses_each_tokens_own_step():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 10) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1)
    q = ActQuantizer(4, 'per_token')
    _set_step(q, [0.9])
    out = q(x)
    peak = x.abs().amax(-1, keepdim=True)
    s = 0.9 * peak / 7
    expected = torch.clamp(torch.round(x / s), -8, 7) * s
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    ratio = out.abs().amax(-1) / peak.squeeze(-1)
    assert ratio.max() <= 0.9 * 8 / 7 + 1e-6  # clipped near 0.9 * peak


def test_unsigned_for_softmax_outputs():
    probs = torch.softmax(torch.randn(2, 4, 9, 9), -1)
    q = ActQuantizer(4, 'per_tensor', signed=False)
    q.begin_calibration()
    q(probs)
    q.end_calibration()
    out = q(probs)
    assert out.min() >= 0
    levels = torch.unique(torch.round(out / q.effective_step()))
    assert levels.max() <= 15 and len(levels) > 8


def test_enable_disable_is_exact_identity():
    x = torch.randn(3, 4)
    q = ActQuantizer(3, 'per_tensor')
    _set_step(q, [0.3])
    assert not torch.equal(q(x), x)
    q.disable()
    assert q(x) is x
    q.enable()
    assert not torch.equal(q(x), x)


def test_state_dict_round_trip():
    q = ActQuantizer(4, 'per_channel', num_channels=5)
    q.begin_calibration()
    q(torch.randn(10, 5))
    q.end_calibration()
    q.disable()
    state = q.state_dict()
    assert set(state) == {'step', 'enabled', 'calibrated'}
    fresh = ActQuantizer(4, 'per_channel', num_channels=5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.step, q.step)
    assert not bool(fresh.enabled) and bool(fresh.calibrated)


def test_calibration_closed_forms():
    x = torch.tensor([[1.0, -4.0, 0.0], [-2.0, 3.0, 0.5]])
    q = ActQuantizer(4, 'per_channel', num_channels=3)
    q.begin_calibration()
    assert q(x) is x  # observing never changes activations
    q(x * 0.5)
    q.end_calibration()
    torch.testing.assert_close(q.step.data, torch.tensor([2.0, 4.0, 0.5]) / 7)

    flat = torch.arange(1, 1001, dtype=torch.float32) - 500.5
    qt = ActQuantizer(4, 'per_tensor')
    qt.begin_calibration()
    qt(flat)
    qt.end_calibration()
    bound = torch.quantile(flat, torch.tensor([0.01, 0.99])).abs().max()
    torch.testing.assert_close(qt.step.data, (bound / 7).reshape(1))


def test_calibration_ignores_non_finite_values():
    x = torch.tensor([[1.0, float('nan')], [float('inf'), -3.0]])
    q = ActQuantizer(4, 'per_channel', num_channels=2)
    q.begin_calibration()
    q(x)
    q.end_calibration()
    torch.testing.assert_close(q.step.data, torch.tensor([1.0, 3.0]) / 7)
    qt = ActQuantizer(4, 'per_tensor')
    qt.begin_calibration()
    qt(torch.full((4,), float('nan')))
    with pytest.raises(CalibrationError, match='no finite values'):
        qt.end_calibration()


def test_zero_channel_keeps_a_positive_step():
    q = ActQuantizer(4, 'per_channel', num_channels=2)
    q.begin_calibration()
    q(torch.tensor([[0.0, 1.0]]))
    q.end_calibration()
    assert (q.effective_step() > 0).all()
    assert torch.isfinite(q(torch.tensor([[0.3, 0.2]]))).all()


def test_step_stays_positive_after_a_negative_update():
    q = ActQuantizer(4, 'per_tensor')
    _set_step(q, [-0.25])
    assert q.effective_step().item() == 0.25
    _set_step(q, [0.0])
    assert q.effective_step().item() > 0
    assert torch.isfinite(q(torch.randn(5))).all()


def test_half_precision_inputs_keep_their_dtype():
    q = ActQuantizer(4, 'per_tensor')
    _set_step(q, [0.1])
    x = torch.randn(8, 8).to(torch.bfloat16)
    out = q(x)
    assert out.dtype == torch.bfloat16
    # Quantized in float32, then cast back once.
    torch.testing.assert_close(out, q(x.float()).to(torch.bfloat16), atol=0,
                               rtol=0)


@pytest.mark.parametrize('kwargs, message', [
    (dict(bits=1), 'bits=1 is out of range'),
    (dict(bits=9), 'bits=9 is out of range'),
    (dict(granularity='per_row'), "granularity='per_row' is unknown"),
    (dict(granularity='per_channel'), 'needs num_channels'),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ActQuantizer(**kwargs)
