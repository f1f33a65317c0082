"""TimmViT's feature pyramid: shapes, strides and a memory layout that
mmdet's RoI extractors read correctly."""
import pytest
import torch
from mmcv.ops import RoIAlign
from torchvision.ops import roi_align

from gplq_mmdet import TimmViT


@pytest.mark.parametrize('name', ['vit_small_patch14_dinov2',
                                  'deit_tiny_patch16_224'])
def test_pyramid_strides_channels_and_layout(name):
    torch.manual_seed(0)
    vit = TimmViT(name, img_size=224).eval()
    dim = vit.vit.embed_dim
    with torch.no_grad():
        levels = vit(torch.randn(2, 3, 96, 128))
    assert [tuple(f.shape) for f in levels] == [
        (2, dim // 4, 24, 32), (2, dim // 2, 12, 16), (2, dim, 6, 8),
        (2, dim, 3, 4)]
    assert tuple(vit.out_channels) == (dim // 4, dim // 2, dim, dim)
    # The token map is a channels-last view; the outputs must not be.
    assert all(f.is_contiguous() for f in levels)


def test_mmcv_roi_align_reads_the_pyramid_like_torchvision():
    """mmcv's RoIAlign indexes raw NCHW memory: on a channels-last tensor it
    returns features of the wrong pixels. The pyramid's outputs must give
    the same RoI features as torchvision's layout-aware reference."""
    torch.manual_seed(0)
    vit = TimmViT('deit_tiny_patch16_224', img_size=224).eval()
    rois = torch.tensor([[0, 8.0, 12.0, 60.0, 50.0],
                         [1, 30.0, 4.0, 90.0, 70.0]])
    op = RoIAlign(7, 1 / 4, sampling_ratio=2, aligned=True)
    with torch.no_grad():
        level = vit(torch.randn(2, 3, 96, 128))[0]
        torch.testing.assert_close(
            op(level, rois),
            roi_align(level, rois, 7, 1 / 4, sampling_ratio=2, aligned=True))
        # What the layout guard protects against:
        channels_last = level.contiguous(memory_format=torch.channels_last)
        assert not torch.allclose(op(channels_last, rois), op(level, rois))
