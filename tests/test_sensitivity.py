"""Per-layer error and the sensitivity sweep (gplq_mmdet.sensitivity)."""
import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from mmdet.models.backbones import SwinTransformer

from gplq_mmdet import calibrate_act_quant, prepare_act_quant, set_act_quant
from gplq_mmdet.sensitivity import (
    Switchboard,
    block_of,
    feature_error,
    kind_of,
    layer_errors,
    sweep,
)
from gplq_mmdet.stage2 import quantize_weights_, weight_quant_targets

from .conftest import ROOT, STAGE1_CONFIG
from .test_quantize_tool import _options


def test_kinds_and_blocks_of_names():
    assert kind_of('vit.blocks.3.mlp.fc2') == 'vit.blocks.*.mlp.fc2'
    assert kind_of('vit.blocks.3.attn.q_quantizer') == 'vit.blocks.*.attn.q'
    assert kind_of('vit.blocks.0.attn.qkv.input_quantizer') == \
        'vit.blocks.*.attn.qkv'
    assert kind_of('stages.1.blocks.0.attn.w_msa.attn_quantizer') == \
        'stages.*.blocks.*.attn.w_msa.attn'
    assert block_of('stages.1.blocks.0.ffn.layers.1') == 'stages.1.blocks.0'
    assert block_of('vit.blocks.11.mlp.fc1') == 'vit.blocks.11'
    assert block_of('patch_embed.projection') is None


@pytest.fixture(scope='module')
def board():
    torch.manual_seed(0)
    swin = SwinTransformer(embed_dims=32, depths=(1, 1, 1, 1),
                           num_heads=(1, 2, 4, 8), window_size=7)
    swin.eval()
    batches = [torch.randn(1, 3, 64, 64) for _ in range(2)]
    prepare_act_quant(swin, dict(a_bits=4))
    calibrate_act_quant(swin, batches, swin, 2)
    quantized = quantize_weights_(copy.deepcopy(swin), dict(w_bits=4))
    names = {m: n for n, m in quantized.named_modules()}
    weights = {names[m]: m.weight.detach().clone()
               for _, m, _ in weight_quant_targets(quantized)}
    return Switchboard(swin, weights), quantized, batches


def test_switchboard_all_off_is_fp32_and_all_on_is_w4a4(board):
    board, quantized, batches = board
    x = batches[0]
    fp32 = copy.deepcopy(board.model)
    set_act_quant(fp32, False)
    board.set([])
    with torch.no_grad():
        for a, b in zip(board.model(x), fp32(x), strict=True):
            torch.testing.assert_close(a, b)
        board.set(board.switches)
        for a, b in zip(board.model(x), quantized(x), strict=True):
            torch.testing.assert_close(a, b)
    board.set([])


def test_layer_error_matches_a_direct_computation(board):
    board, _, batches = board
    rows = {r['layer']: r for r in layer_errors(board, board.model,
                                                batches[:1])}
    first = board.model.stages[0].blocks[0].attn.w_msa.qkv
    name = 'stages.0.blocks.0.attn.w_msa.qkv'
    captured = []
    handle = first.register_forward_hook(
        lambda m, a, o: captured.append((a[0], o)))
    board.set([])
    with torch.no_grad():
        board.model(batches[0])
        handle.remove()
        x, ref = captured[0]
        q = first.input_quantizer
        q.enable(True)
        err = F.linear(q(x), first.weight, first.bias) - ref
        q.enable(False)
        w_err = F.linear(x, board.quantized[name], first.bias) - ref
    expected_in = float(err.pow(2).sum() / ref.pow(2).sum())
    expected_w = float(w_err.pow(2).sum() / ref.pow(2).sum())
    assert rows[name]['input_error'] == pytest.approx(expected_in, rel=1e-5)
    assert rows[name]['weight_error'] == pytest.approx(expected_w, rel=1e-5)
    assert rows[name]['kind'] == 'stages.*.blocks.*.attn.w_msa.qkv'
    assert all(r['input_error'] > 0 for r in rows.values())


def test_sweep_keeping_everything_fp32_removes_all_error(board):
    board, _, batches = board
    result = sweep(board, board.model, batches,
                   groups={'everything': board.switches,
                           'nothing': []})
    rows = {r['group']: r for r in result['groups']}
    assert result['full_error'] > 0
    assert rows['everything']['error_without'] == 0.0
    assert rows['everything']['share_removed'] == pytest.approx(1.0)
    assert rows['nothing']['error_without'] == pytest.approx(
        result['full_error'])
    groups = board.groups()
    assert any(g.startswith('A ') for g in groups)
    assert any(g.startswith('W ') for g in groups)
    assert any(g.startswith('block ') for g in groups)
    board.set([])
    reference = [list(board.model(b)) for b in batches]
    assert feature_error(board.model, batches, reference) == 0.0


def test_sensitivity_tool_on_a_stage1_checkpoint(stage1_run, tiny_shapes,
                                                 tmp_path):
    _, _, work = stage1_run
    proc = subprocess.run(
        [sys.executable, 'tools/sensitivity.py', str(STAGE1_CONFIG),
         str(work / 'epoch_1.pth'), '--batches',
         '2', '--map-groups', '1', '--work-dir', str(tmp_path),
         '--cfg-options', *_options(tiny_shapes)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / 'sensitivity.json').read_text())
    assert report['bits'] == 'W4A4'
    assert report['sweep']['full_error'] > 0
    assert len(report['map']) == 2
    assert all(0 <= m['bbox_mAP'] <= 1 for m in report['map'])
    assert '### Per-layer error' in (tmp_path / 'sensitivity.md').read_text()
