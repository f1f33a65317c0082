"""PCA mimic loss against closed forms."""
import pytest
import torch

from gplq_mmdet.losses import PCABasis, PCAMimicLoss, as_samples, choose_k


def test_choose_k_rounds_up_to_a_multiple_of_32():
    # 256 equal components: 60% needs 154 of them -> 160.
    assert choose_k(torch.ones(256)) == 160
    # Dominant first component: 32 is the smallest multiple.
    vals = torch.cat([torch.tensor([300.0]), torch.ones(127)])
    assert choose_k(vals) == 32
    # Fewer dimensions than the multiple: all of them.
    assert choose_k(torch.ones(20)) == 20
    with pytest.raises(ValueError, match='explained'):
        choose_k(torch.ones(4), explained=0)


def test_pca_basis_recovers_known_directions():
    torch.manual_seed(0)
    dim = 64
    scales = torch.cat([torch.full((8,), 10.0), torch.full((56,), 0.1)])
    q, _ = torch.linalg.qr(torch.randn(dim, dim))
    samples = (torch.randn(5000, dim) * scales) @ q.T + 3.0
    basis = PCABasis(dim)
    basis.fit(samples, explained=0.6, multiple=8)
    assert int(basis.k) == 8
    assert float(basis.explained) > 0.99
    torch.testing.assert_close(basis.mean, torch.full((dim,), 3.0),
                               atol=0.5, rtol=0)
    # The basis spans the 8 high-variance directions.
    top = q[:, :8]
    overlap = (basis.basis[:, :8].T @ top).pow(2).sum()
    assert overlap > 7.9


def test_loss_zero_for_equal_features_and_closed_form_otherwise():
    torch.manual_seed(1)
    feats = [torch.randn(2, 32, 5, 5), torch.randn(2, 64, 3, 3)]
    loss = PCAMimicLoss([32, 64])
    loss.fit([as_samples(f) for f in feats])
    assert loss(feats, feats).item() == 0.0
    shifted = [f + 0.5 for f in feats]
    value = loss(shifted, feats)
    expected = 0.0
    for level, s, t in zip(loss.levels, shifted, feats, strict=True):
        k = int(level.k)
        v = level.basis[:, :k]
        d = (as_samples(s) - as_samples(t)) @ v
        expected += d.pow(2).sum(1).mean().item()
    assert value.item() == pytest.approx(expected / 2, rel=1e-5)
    assert value.item() > 0


def test_state_dict_round_trip_and_errors():
    loss = PCAMimicLoss([32])
    with pytest.raises(RuntimeError, match='before fit'):
        loss([torch.zeros(1, 32)], [torch.zeros(1, 32)])
    loss.fit([torch.randn(100, 32)])
    fresh = PCAMimicLoss([32])
    fresh.load_state_dict(loss.state_dict())
    assert fresh.fitted and int(fresh.levels[0].k) == int(loss.levels[0].k)
    with pytest.raises(ValueError, match='expected 1 feature levels'):
        loss([torch.zeros(1, 32)] * 2, [torch.zeros(1, 32)] * 2)
    with pytest.raises(ValueError, match='cannot mimic'):
        as_samples(torch.zeros(2, 2, 2, 2, 2))
