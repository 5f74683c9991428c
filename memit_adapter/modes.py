"""The one way this library sets a model's flags for a while and puts every one of them back.

Usage::

    with evaluating(model):                       # every module in eval mode
        ...
    with evaluating(model, freeze=True):          # and no parameter requires grad
        ...

On exit, also on an exception, each module gets back its own ``training`` flag (a model whose dropout
submodules were in train mode while the rest was in eval mode comes back exactly so) and each parameter its
own ``requires_grad``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module, *, freeze: bool = False) -> Iterator[nn.Module]:
    """Eval mode for every module of ``model`` (and, with ``freeze``, no parameter gradients) inside the block;
    every module's ``training`` and every parameter's ``requires_grad`` as they were afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    # by name: accelerate's offload hooks put a new parameter object in place for each forward
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()] if freeze else []
    model.eval()
    for n, _ in grads:
        model.get_parameter(n).requires_grad_(False)
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for n, flag in grads:
            model.get_parameter(n).requires_grad_(flag)
