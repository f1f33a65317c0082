"""QwT compensation: the closed form, that it lowers block output error,
the skip rule, and that compensations survive state_dict and mmengine's
checkpoint loading."""
import copy

import pytest
import torch
from mmdet.models.backbones import SwinTransformer
from mmengine.runner.checkpoint import load_state_dict

from gplq_mmdet import calibrate_act_quant, prepare_act_quant, remove_act_quant
from gplq_mmdet.qwt import (
    ATTR,
    QwTCompensation,
    _Moments,
    compensate_qwt_,
    qwt_blocks,
)
from gplq_mmdet.stage2 import (
    WeightQuantConfig,
    packed_state,
    quantize_weights_,
    unpack_state,
)


def _run(module, batch):
    return module(batch)


def _swin() -> SwinTransformer:
    torch.manual_seed(0)
    swin = SwinTransformer(embed_dims=32, depths=(2, 1, 1, 1),
                           num_heads=(1, 2, 4, 8))
    swin.eval()  # mmdet's SwinTransformer.train() returns None
    return swin


def _w3a4_pair(batches):
    """(W3A4 model, its W32A4 reference) of one act-calibrated Swin."""
    swin = _swin()
    prepare_act_quant(swin, dict(a_bits=4))
    calibrate_act_quant(swin, batches, swin, len(batches))
    reference = copy.deepcopy(swin)
    quantize_weights_(swin, WeightQuantConfig(w_bits=3, method='minmax'))
    return swin, reference


def _block_mse(model, reference, name, batches) -> float:
    """Mean squared gap between the two models' outputs of block ``name``."""
    outs = {}

    def grab(key):
        return lambda m, a, o: outs.setdefault(key, []).append(o)

    handles = [dict(model.named_modules())[name].register_forward_hook(
        grab('q')), dict(reference.named_modules())[name]
        .register_forward_hook(grab('r'))]
    with torch.no_grad():
        for b in batches:
            model(b)
            reference(b)
    for h in handles:
        h.remove()
    pairs = zip(outs['q'], outs['r'], strict=True)
    return float(sum(((r - q)**2).sum() for q, r in pairs)
                 / sum(r.numel() for r in outs['r']))


def test_moments_solve_the_ridge_closed_form():
    torch.manual_seed(0)
    x = torch.randn(500, 6, dtype=torch.float64)
    w_true = torch.randn(4, 6, dtype=torch.float64)
    e = x @ w_true.T + 0.3 + 0.01 * torch.randn(500, 4, dtype=torch.float64)
    m = _Moments.zeros(6, 4)
    m.add(x[:200], e[:200])
    m.add(x[200:], e[200:])
    xa = torch.cat([x, torch.ones(500, 1, dtype=x.dtype)], 1)
    # W* = E^T X (X^T X + lambda I)^-1 with lambda relative to mean diag.
    lam = 0.1 * float((x * x).sum(0).mean())
    expected = e.T @ xa @ torch.linalg.inv(xa.T @ xa
                                           + lam * torch.eye(7).double())
    torch.testing.assert_close(m.solve(0.1), expected)
    w = m.solve(0.0)
    torch.testing.assert_close(w[:, :6], w_true, atol=2e-3, rtol=0)
    torch.testing.assert_close(w[:, 6], torch.full((4,), 0.3).double(),
                               atol=2e-3, rtol=0)
    # The error from the moments equals the direct residual.
    direct = float(((e - xa @ w.T)**2).mean())
    assert m.error(w) == pytest.approx(direct, rel=1e-6)
    assert m.error(torch.zeros_like(w)) == pytest.approx(
        float((e**2).mean()), rel=1e-9)


def test_qwt_lowers_each_blocks_output_error_on_its_calibration_data():
    torch.manual_seed(1)
    batches = [torch.randn(2, 3, 64, 64) for _ in range(8)]
    model, reference = _w3a4_pair(batches)
    names = [n for n, _ in qwt_blocks(model)]
    assert len(names) == 5  # depths 2+1+1+1
    before = {n: _block_mse(model, reference, n, batches) for n in names}
    results = compensate_qwt_(model, reference, batches, _run)
    after = {n: _block_mse(model, reference, n, batches) for n in names}
    assert [r.block for r in results] == names
    kept = [r.block for r in results if r.kept]
    assert kept, results
    for r in results:
        assert (r.error_after < r.error_before) == r.kept
        block = dict(model.named_modules())[r.block]
        assert (ATTR in block._modules) == r.kept
    # The first block sees the same input in both runs, so its own gap is
    # what the fit reduced; later blocks also gain from earlier fixes.
    first = names[0]
    assert results[0].kept and after[first] < 0.8 * before[first]
    assert after[names[-1]] < before[names[-1]]


def test_blocks_are_skipped_where_compensation_does_not_help():
    torch.manual_seed(2)
    batches = [torch.randn(1, 3, 64, 64) for _ in range(4)]
    swin = _swin()
    prepare_act_quant(swin, dict(a_bits=4))
    calibrate_act_quant(swin, batches, swin, 4)
    # Reference == model: there is no gap, so nothing can lower the error.
    results = compensate_qwt_(swin, copy.deepcopy(swin), batches, _run)
    assert results and not any(r.kept for r in results)
    assert all(r.error_before == 0 for r in results)
    assert not any(isinstance(m, QwTCompensation) for m in swin.modules())


def test_compensations_survive_state_dict_and_mmengine_loading():
    torch.manual_seed(3)
    batches = [torch.randn(1, 3, 64, 64) for _ in range(4)]
    model, reference = _w3a4_pair(batches)
    compensate_qwt_(model, reference, batches, _run)
    # What a quantized checkpoint holds, unpacked as mmengine's loader does.
    state = unpack_state(packed_state(model))
    keys = [k for k in state if f'.{ATTR}.' in k]
    assert keys and all(k.endswith(('.weight', '.bias')) for k in keys)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    for loader in ('torch', 'mmengine'):
        fresh = _swin()
        prepare_act_quant(fresh, dict(a_bits=4))
        if loader == 'torch':
            fresh.load_state_dict(state, strict=True)
        else:
            load_state_dict(fresh, state, strict=True)
        with torch.no_grad():
            for got, want in zip(fresh(x), expected, strict=True):
                assert torch.equal(got, want), loader
    remove_act_quant(model)
    assert not any(f'.{ATTR}.' in k for k in model.state_dict())
    with torch.no_grad():
        assert model.stages[0].blocks[0](torch.randn(1, 256, 32),
                                         (16, 16)).shape == (1, 256, 32)


def test_bad_settings_are_explained():
    batches = [torch.randn(1, 3, 64, 64)]
    model, reference = _w3a4_pair(batches)
    with pytest.raises(ValueError, match='at least 2 calibration batches'):
        compensate_qwt_(model, reference, batches, _run)
    with pytest.raises(ValueError, match='ridge=-1 must be >= 0'):
        compensate_qwt_(model, reference, batches * 2, _run, ridge=-1)
    with pytest.raises(ValueError, match='qwt_ridge=-0.5 must be >= 0'):
        WeightQuantConfig(qwt=True, qwt_ridge=-0.5)
