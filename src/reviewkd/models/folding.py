"""BatchNorm folded into the convolution before it, for frozen (eval-mode) networks.

A frozen teacher's BatchNorm is an affine map with fixed numbers, so ``bn(conv(x))`` equals one
convolution with rescaled weights and a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``), exact up
to float rounding. That saves one pass over every normalised feature map per teacher forward.

Which pairs fold is found by watching one forward pass: a BatchNorm folds into a convolution when its
input is the very tensor that convolution returned, no other operation reads that tensor, each ran
once, and neither is read by a feature tap (``protected``). Nothing is assumed about the architecture; the folded network is then checked
against the original on the same input (logits and every protected tap), and kept only if they agree
to float rounding. The BatchNorm becomes ``nn.Identity`` under the same name, so feature taps on it
(pre-activation features) still resolve and read the same values.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.overrides import TorchFunctionMode

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# exact types only: subclasses (timm's BatchNormAct2d, ...) do more than normalise
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _UseCounter(TorchFunctionMode):
    """Counts, during one forward pass, how often each watched tensor is an argument of a torch
    operation outside the BatchNorm that reads it (any such use makes its fold unsafe: a residual
    reading the raw convolution output, an in-place activation before the BatchNorm, ...)."""

    def __init__(self):
        super().__init__()
        self.watched: dict[int, torch.Tensor] = {}
        self.other_uses: dict[int, int] = {}
        self.inside_batchnorm = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside_batchnorm:
            for value in (*args, *kwargs.values()):
                for t in value if isinstance(value, (list, tuple)) else (value,):
                    if torch.is_tensor(t) and self.watched.get(id(t)) is t:
                        self.other_uses[id(t)] = self.other_uses.get(id(t), 0) + 1
        return func(*args, **kwargs)


def foldable_pairs(model: nn.Module, sample: torch.Tensor, protected: Iterable[str] = ()) -> list[tuple[str, str]]:
    """``(conv name, batchnorm name)`` pairs of ``model`` (eval mode) whose BatchNorm reads the
    convolution's output and nothing else reads it, found by one forward pass on ``sample``."""
    protected = set(protected)
    names = {m: n for n, m in model.named_modules()}
    calls: dict[str, int] = {}
    conv_of: dict[int, str] = {}  # id of a convolution's output -> that convolution's name
    reads: list[tuple[str, str, int]] = []
    counter = _UseCounter()
    handles = []

    def count(name):
        calls[name] = calls.get(name, 0) + 1

    def after_conv(module, args, output):
        count(names[module])
        # kept alive in the counter, so that its id is not reused by another tensor during the pass
        counter.watched[id(output)], conv_of[id(output)] = output, names[module]

    def before_bn(module, args):
        count(names[module])
        counter.inside_batchnorm += 1
        if counter.watched.get(id(args[0])) is args[0]:
            reads.append((conv_of[id(args[0])], names[module], id(args[0])))

    def after_bn(module, args, output):
        counter.inside_batchnorm -= 1

    for module, name in names.items():
        if isinstance(module, _CONVS):
            handles.append(module.register_forward_hook(after_conv))
        elif type(module) in _BATCHNORMS:
            handles.append(module.register_forward_pre_hook(before_bn))
            handles.append(module.register_forward_hook(after_bn))
    try:
        with torch.no_grad(), counter:
            model(sample)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    return [(c, b) for c, b, key in reads
            if calls[c] == 1 and calls[b] == 1 and not counter.other_uses.get(key)
            and c not in protected and b not in protected
            and modules[b].affine and modules[b].track_running_stats
            and modules[c].padding_mode == "zeros" and type(modules[c]) in _CONVS]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def fold_batchnorms(model: nn.Module, sample: torch.Tensor, protected: Iterable[str] = (),
                    outputs: Optional[Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]] = None,
                    rtol: float = 1e-4) -> tuple[nn.Module, int]:
    """A copy of eval-mode ``model`` with its foldable BatchNorms folded, and how many were folded.

    ``outputs(net, sample)`` gives the tensors that must not change (default: the network's output);
    they are compared before and after, relative to each tensor's largest magnitude, and ``model``
    itself is returned (with 0) when any differs by more than ``rtol`` or nothing folds.
    """
    if model.training:
        raise ValueError("fold_batchnorms needs a model in eval mode (running statistics are what folds)")
    outputs = outputs or (lambda net, x: [net(x)])
    pairs = foldable_pairs(model, sample, protected)
    if not pairs:
        return model, 0
    folded = copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        fused = fuse_conv_bn_eval(conv, bn)
        fused.requires_grad_(conv.weight.requires_grad)
        _set(folded, conv_name, fused)
        _set(folded, bn_name, nn.Identity())
    with torch.no_grad():
        before, after = outputs(model, sample), outputs(folded, sample)
    for a, b in zip(before, after):
        scale = a.detach().float().abs().max().clamp_min(1e-12)
        if a.shape != b.shape or ((a.float() - b.float()).abs().max() / scale) > rtol:
            return model, 0
    return folded, len(pairs)
