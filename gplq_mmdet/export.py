"""ONNX export of a quantized detector's backbone and neck with
QuantizeLinear/DequantizeLinear (QDQ) pairs.

Every enabled activation quantizer becomes ``QuantizeLinear -> Clip ->
DequantizeLinear``: the integer values travel in int8 (signed) or uint8
(unsigned, the softmax output) containers, and the ``Clip`` narrows them to
the quantizer's 2..8-bit range, since ``QuantizeLinear`` itself only
saturates at the container's range. Per-channel steps use the ``axis``
attribute. Every weight quantized by stage 2 is stored as an int8
initializer (values in the weight's bit range) with a per-output-channel
``DequantizeLinear``, so the file carries the integer weights, not floats.
Per-token activation quantizers have a step computed from each token at run
time, which QDQ's per-axis scales cannot express; they export as plain
arithmetic (``ReduceMax``, ``Div``, ``Round``, ``Clip``, ``Mul``).

The export works on a copy: the model passed in is not modified.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import MIN_STEP, ActQuantizer
from .surgery import iter_quantizers, quant_config_of

#: Opset 13 is the first with per-axis QuantizeLinear and int8 Clip.
DEFAULT_OPSET = 17


class ExportError(ValueError):
    """The model cannot be exported as asked (the message says why)."""


class _FakeQuantQDQ(torch.autograd.Function):
    """Forward: torch's fake quantization (the same arithmetic as the
    quantizer's); ONNX: QuantizeLinear, Clip, DequantizeLinear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, axis: int,
                q_min: int, q_max: int) -> torch.Tensor:
        if axis < 0:
            zero = torch.zeros((), dtype=torch.int32)
            return torch.fake_quantize_per_tensor_affine(
                x, scale, zero, q_min, q_max)
        zero = torch.zeros(scale.shape, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(
            x, scale, zero, axis, q_min, q_max)

    @staticmethod
    def symbolic(g, x, scale, axis: int, q_min: int, q_max: int):
        container = torch.int8 if q_min < 0 else torch.uint8
        per_axis = axis >= 0
        zero = torch.zeros(
            _static_length(scale) if per_axis else (), dtype=container)
        zero = g.op('Constant', value_t=zero)
        attrs = {'axis_i': axis} if per_axis else {}
        q = g.op('QuantizeLinear', x, scale, zero, **attrs)
        low = g.op('Constant', value_t=torch.tensor(q_min, dtype=container))
        high = g.op('Constant', value_t=torch.tensor(q_max, dtype=container))
        q = g.op('Clip', q, low, high)
        return g.op('DequantizeLinear', q, scale, zero, **attrs)


class _DequantizeWeight(torch.autograd.Function):
    """Forward: ``ints * scale`` per output channel; ONNX: an int8
    initializer and a per-axis DequantizeLinear."""

    @staticmethod
    def forward(ctx, ints: torch.Tensor, scale: torch.Tensor
                ) -> torch.Tensor:
        shape = (-1, ) + (1, ) * (ints.dim() - 1)
        return ints.float() * scale.reshape(shape)

    @staticmethod
    def symbolic(g, ints, scale):
        zero = g.op('Constant', value_t=torch.zeros(
            _static_length(scale), dtype=torch.int8))
        return g.op('DequantizeLinear', ints, scale, zero, axis_i=0)


def _static_length(value) -> int:
    sizes = value.type().sizes()
    if not sizes:
        raise ExportError('a per-axis scale must have a known length')
    return int(sizes[0])


def _export_quantizer_forward(self: ActQuantizer,
                              x: torch.Tensor) -> torch.Tensor:
    if not bool(self.enabled):
        return x
    step = self.effective_step().detach().float()
    if self.granularity == 'per_tensor':
        return _FakeQuantQDQ.apply(x, step.reshape(()), -1, self.q_min,
                                   self.q_max)
    if self.granularity == 'per_channel':
        axis = self.channel_dim % x.dim()
        return _FakeQuantQDQ.apply(x, step, axis, self.q_min, self.q_max)
    peak = x.abs() if self.signed else x.clamp_min(0)
    peak = peak.amax(-1, keepdim=True).clamp_min(MIN_STEP)
    token_step = step * peak / self.q_max
    return torch.clamp(torch.round(x / token_step), self.q_min,
                       self.q_max) * token_step


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = _DequantizeWeight.apply(self.weight_int, self.weight_scale)
    return F.linear(x, weight, self.bias)


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    weight = _DequantizeWeight.apply(self.weight_int, self.weight_scale)
    return self._conv_forward(x, weight, self.bias)


class BackboneNeck(nn.Module):
    """The exported part of a detector: image in, feature maps out."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone = detector.backbone
        self.neck = detector.neck if getattr(detector, 'with_neck',
                                             False) else None

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.backbone(image)
        return tuple(self.neck(feats) if self.neck is not None else feats)


def exportable_copy(detector: nn.Module) -> BackboneNeck:
    """A copy of the detector's backbone and neck whose quantizers and
    stage-2 weights trace to QDQ operators. Its PyTorch outputs equal the
    quantized model's."""
    if quant_config_of(detector) is None:
        raise ExportError(
            'the model has no activation quantizers: export a stage-1 or '
            'stage-2 model (a gplq config and its checkpoint)')
    if quant_config_of(detector).w_bits is not None:
        raise ExportError(
            'this is a full-QAT baseline model (quant_cfg.w_bits is set): '
            'its weights are fake-quantized by learned LSQ steps, which the '
            'exporter does not pack; export GPLQ stage-2 models')
    missing = [name for name, q in iter_quantizers(detector)
               if bool(q.enabled) and not bool(q.calibrated)]
    if missing:
        raise ExportError(
            f'{len(missing)} enabled quantizers were never calibrated (first:'
            f' {missing[0]}); export a checkpoint written by stage 1 or by '
            'tools/quantize.py')
    part = copy.deepcopy(BackboneNeck(detector)).eval()
    for module in part.modules():
        if isinstance(module, ActQuantizer):
            module.forward = MethodType(_export_quantizer_forward, module)
        elif hasattr(module, 'weight_scale') and isinstance(
                module, (nn.Linear, nn.Conv2d)):
            rows = module.weight.detach().reshape(module.weight.shape[0], -1)
            ints = torch.round(rows / module.weight_scale[:, None])
            module.register_buffer(
                'weight_int', ints.to(torch.int8).reshape(
                    module.weight.shape))
            module.forward = MethodType(
                _linear_forward if isinstance(module, nn.Linear)
                else _conv_forward, module)
    return part


@contextmanager
def _fixed_vit_position_embeddings(part: nn.Module,
                                   image: torch.Tensor) -> Iterator[None]:
    """timm ViTs with ``dynamic_img_size`` resample their position
    embedding on every forward with antialiased bicubic interpolation,
    which ONNX cannot express, and always so while exporting. For a
    fixed-size export the result is a constant: run the model once,
    record timm's own resampled embeddings, and let the export use them."""
    from timm.models import vision_transformer as timm_vit

    if not any(isinstance(m, timm_vit.VisionTransformer)
               and m.dynamic_img_size and m.pos_embed is not None
               for m in part.modules()):
        yield
        return
    resample = timm_vit.resample_abs_pos_embed
    fixed: dict[int, torch.Tensor] = {}

    def record(posemb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = resample(posemb, *args, **kwargs)
        fixed[id(posemb)] = out.detach()
        return out

    try:
        timm_vit.resample_abs_pos_embed = record
        with torch.no_grad():
            part(image)
        timm_vit.resample_abs_pos_embed = (
            lambda posemb, *args, **kwargs: fixed[id(posemb)])
        yield
    finally:
        timm_vit.resample_abs_pos_embed = resample


@dataclass(frozen=True)
class ExportSummary:
    """What the written file contains."""

    path: str
    quantize_linear: int
    dequantize_linear: int
    int8_weights: int
    outputs: tuple[str, ...]


def export_onnx(detector: nn.Module, path: str | os.PathLike,
                image_size: tuple[int, int],
                opset: int = DEFAULT_OPSET) -> ExportSummary:
    """Write the quantized backbone and neck of ``detector`` to ``path``
    for a ``1 x 3 x H x W`` image (fixed size: Swin's padding and window
    shifts are traced for it). The file appears only when complete."""
    import onnx

    if opset < 13:
        raise ExportError(f'opset {opset} has no per-axis QuantizeLinear; '
                          'use opset >= 13')
    part = exportable_copy(detector)
    device = next(part.parameters()).device
    image = torch.zeros(1, 3, *image_size, device=device)
    with torch.no_grad():
        num_outputs = len(part(image))
    outputs = tuple(f'feat{i}' for i in range(num_outputs))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    os.close(fd)
    try:
        with warnings.catch_warnings(), \
                _fixed_vit_position_embeddings(part, image):
            # Shape arithmetic traced to constants is what a fixed-size
            # export means; the tracer warns about each instance.
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            torch.onnx.export(part, (image, ), tmp, dynamo=False,
                              opset_version=opset, input_names=['image'],
                              output_names=list(outputs),
                              do_constant_folding=True)
        graph = onnx.load(tmp).graph
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    ops = [node.op_type for node in graph.node]
    int8 = sum(init.data_type == onnx.TensorProto.INT8 and len(init.dims) > 1
               for init in graph.initializer)
    return ExportSummary(str(path), ops.count('QuantizeLinear'),
                         ops.count('DequantizeLinear'), int8, outputs)


#: onnxruntime graph optimization levels by name. ``basic`` folds constants
#: and removes redundant nodes but keeps the QDQ arithmetic exact;
#: ``all`` also fuses ``DequantizeLinear(int8 weight) -> MatMul`` into
#: ``MatMulNBits`` kernels, which are faster but compute approximately.
ORT_LEVELS = ('basic', 'all')


def run_onnxruntime(path: str | os.PathLike, image: torch.Tensor,
                    optimization: str = 'basic') -> list[torch.Tensor]:
    """The exported model's outputs for ``image`` on onnxruntime's CPU."""
    import onnxruntime as ort

    if optimization not in ORT_LEVELS:
        raise ExportError(f'optimization={optimization!r} is unknown: use '
                          f'{" or ".join(ORT_LEVELS)}')
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimization ==
        'basic' else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    session = ort.InferenceSession(str(path), options,
                                   providers=['CPUExecutionProvider'])
    outputs = session.run(None, {'image': image.detach().cpu().numpy()})
    return [torch.from_numpy(o) for o in outputs]
