"""Which quantizers cost the accuracy: per-layer error and a sensitivity
sweep (plain PyTorch, used by ``tools/sensitivity.py``).

A quantized model here has two kinds of switches: each activation
quantizer (on/off) and each weight-quantized layer (stage-2 weights or the
FP32 weights). :class:`Switchboard` flips them; :func:`feature_error`
measures how far the model's features move from the all-off reference.

* :func:`layer_errors`: in one FP32 pass, for every quantized layer, the
  relative error of its own output caused by quantizing its input alone
  and its weight alone: where the quantization noise enters.
* :func:`sweep`: for each group of switches (a layer kind such as
  ``blocks.*.mlp.fc2``, or a block), the feature error with everything
  quantized except that group: how much of the end-to-end error the
  group is responsible for.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ActQuantizer

_INDEXED = re.compile(r'(blocks|stages)\.\d+')
_BLOCK = re.compile(r'^(.*?(?:blocks|stages)\.\d+(?:\.blocks\.\d+)?)')
_QUANTIZER_SUFFIX = re.compile(r'\.(input_quantizer|([qkv]|attn)_quantizer)$')


def kind_of(name: str) -> str:
    """The layer kind of a module or quantizer name: block and stage
    indices replaced by ``*`` (``vit.blocks.3.mlp.fc2`` ->
    ``vit.blocks.*.mlp.fc2``; an attention operand quantizer keeps its
    operand: ``...attn.q``)."""
    match = _QUANTIZER_SUFFIX.search(name)
    if match is not None:
        operand = match.group(2)
        name = name[:match.start()] + (f'.{operand}' if operand else '')
    return _INDEXED.sub(lambda m: f'{m.group(1)}.*', name)


def block_of(name: str) -> str | None:
    """The transformer block a name belongs to, if any."""
    match = _BLOCK.match(name)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Switch:
    """One thing that can be quantized or not."""

    name: str        # the quantizer's or the layer's qualified name
    what: str        # 'A' (an activation quantizer) or 'W' (a weight)
    kind: str
    block: str | None


class Switchboard:
    """Turn activation quantizers and stage-2 weights on and off.

    ``quantized_weights`` maps layer names to their quantized weight
    tensors; the model's current weights are kept as the FP32 ones.
    """

    def __init__(self, model: nn.Module,
                 quantized_weights: dict[str, torch.Tensor]) -> None:
        self.model = model
        modules = dict(model.named_modules())
        self.quantizers = {n: m for n, m in modules.items()
                           if isinstance(m, ActQuantizer)}
        self.layers = {n: modules[n] for n in quantized_weights}
        self.fp32 = {n: m.weight.detach().clone()
                     for n, m in self.layers.items()}
        self.quantized = quantized_weights
        self.switches = (
            [Switch(n, 'A', kind_of(n), block_of(n)) for n in self.quantizers]
            + [Switch(n, 'W', kind_of(n), block_of(n)) for n in self.layers])

    def set(self, on: Iterable[Switch]) -> None:
        """Quantize exactly the switches in ``on``."""
        on = set(on)
        for s in self.switches:
            if s.what == 'A':
                self.quantizers[s.name].enable(s in on)
            else:
                source = self.quantized if s in on else self.fp32
                with torch.no_grad():
                    self.layers[s.name].weight.copy_(source[s.name])

    def groups(self) -> dict[str, list[Switch]]:
        """Switches grouped by ``A``/``W`` and kind, and by block."""
        out: dict[str, list[Switch]] = defaultdict(list)
        for s in self.switches:
            out[f'{s.what} {s.kind}'].append(s)
            if s.block is not None:
                out[f'block {s.block}'].append(s)
        return dict(out)


def _features(forward: Callable,
              batches: Sequence) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [[f.detach() for f in forward(b)] for b in batches]


def feature_error(forward: Callable, batches: Sequence,
                  reference: list[list[torch.Tensor]]) -> float:
    """``sum ||f - f_ref||^2 / sum ||f_ref||^2`` over batches and levels."""
    num = den = 0.0
    for got, ref in zip(_features(forward, batches), reference, strict=True):
        for g, r in zip(got, ref, strict=True):
            num += float((g - r).pow(2).sum())
            den += float(r.pow(2).sum())
    return num / max(den, 1e-30)


def _apply(module: nn.Module, x: torch.Tensor,
           weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    return module._conv_forward(x, weight, module.bias)


def layer_errors(board: Switchboard, forward: Callable,
                 batches: Sequence) -> list[dict]:
    """Per quantized Linear/Conv2d: the relative error of its output from
    quantizing its own input only, and its own weight only, on the inputs
    it sees in the FP32 model (one pass; nothing upstream quantized)."""
    layers = {n: m for n, m in board.model.named_modules()
              if hasattr(m, 'input_quantizer')}
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])

    def record(name):
        def hook(module, args, output):
            x, ref = args[0], output.detach()
            quantizer = module.input_quantizer
            quantizer.enable(True)
            try:
                err_in = _apply(module, quantizer(x), module.weight) - ref
            finally:
                quantizer.enable(False)
            total = sums[name]
            total[0] += float(err_in.pow(2).sum())
            if name in board.quantized:
                w_q = board.quantized[name].to(module.weight)
                total[1] += float((_apply(module, x, w_q) - ref).pow(2).sum())
            total[2] += float(ref.pow(2).sum())
        return hook

    board.set([])
    handles = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    try:
        _features(forward, batches)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name in layers:
        err_in, err_w, den = sums[name]
        den = max(den, 1e-30)
        row = dict(layer=name, kind=kind_of(name), input_error=err_in / den)
        if name in board.quantized:
            row['weight_error'] = err_w / den
        rows.append(row)
    return rows


def sweep(board: Switchboard, forward: Callable, batches: Sequence,
          groups: dict[str, list[Switch]] | None = None) -> dict:
    """Feature error with everything quantized, and with everything but
    each group (sorted by how much keeping the group FP32 removes)."""
    board.set([])
    reference = _features(forward, batches)
    everything = board.switches
    board.set(everything)
    full = feature_error(forward, batches, reference)
    rows = []
    for label, members in (groups or board.groups()).items():
        keep = set(members)
        board.set([s for s in everything if s not in keep])
        err = feature_error(forward, batches, reference)
        rows.append(dict(group=label, switches=len(members),
                         error_without=err,
                         share_removed=(full - err) / full if full else 0.0))
    board.set(everything)
    rows.sort(key=lambda r: r['error_without'])
    return dict(full_error=full, groups=rows)
