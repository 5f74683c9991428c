"""Forward hooks as context managers that always remove themselves (baukit-style).

Usage::

    with capture_inputs(mlp_out) as seen:        # seen: list of (batch, seq, d_in) tensors
        model(**batch)
    with edit_output(block, lambda h: h + delta_at_positions):
        model(**batch)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook once a forward has given what it was run for: the blocks after it would be wasted.
    The caller runs the forward inside ``try: ... except StopForward: pass``."""


@contextmanager
def capture_inputs(module: nn.Module, *, detach: bool = True) -> Iterator[list[torch.Tensor]]:
    """Record the first positional input of every call of ``module``."""
    seen: list[torch.Tensor] = []

    def hook(_mod, args):
        seen.append(args[0].detach() if detach else args[0])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def capture_outputs(module: nn.Module, *, detach: bool = True) -> Iterator[list[torch.Tensor]]:
    """Record the (first) output tensor of every call of ``module``."""
    seen: list[torch.Tensor] = []

    def hook(_mod, _args, output):
        out = output[0] if isinstance(output, tuple) else output
        seen.append(out.detach() if detach else out)

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the (first) output tensor ``h`` of ``module`` by ``fn(h)`` while inside the block."""

    def hook(_mod, _args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
