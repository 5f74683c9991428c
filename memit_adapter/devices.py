"""Where a model's tensors live when accelerate splits it across devices or offloads it.

Usage::

    module_weight(model, "transformer.h.3.mlp.c_proj")      # its values, also read back from the CPU or the disk
    execution_device(model, "transformer.h.3.mlp.c_proj")   # where its forward runs
    input_device(model)                                     # where the input ids go

Models loaded with ``device_map=...``, ``dispatch_model`` or ``cpu_offload``: every tensor follows its module's
device, and no instance ``forward`` is replaced (accelerate's hooks live there).
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from torch import nn

from .errors import ModelError

# -- weights that accelerate's big-model inference offloads ------------------------------------------------------
# accelerate (dispatch_model, from_pretrained(device_map=...), cpu_offload) leaves an offloaded parameter on the
# meta device and installs an AlignDevicesHook with offload=True as ``module._hf_hook`` (inside a SequentialHook
# when there are several), by replacing ``module.forward``. For each forward the hook loads every tensor of its
# module (and of the submodules, with place_submodules) from ``hook.weights_map[name]`` to
# ``hook.execution_device``, and puts it back on the meta device afterwards. The map either holds the tensors in
# memory and serves the same tensor every time (CPU offload: a state dict) or reads them anew on every access
# (disk offload: a .dat memmap of the offload folder, or the checkpoint's own safetensors file).

def _hf_hooks(module: nn.Module) -> list[Any]:
    """accelerate's hooks on ``module`` (none, its ``_hf_hook``, or the hooks of a SequentialHook), in order."""
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else _flat_hooks(hook)


def _flat_hooks(hook: Any) -> list[Any]:
    inner = getattr(hook, "hooks", None)  # a SequentialHook; it may hold SequentialHooks itself
    return [hook] if inner is None else [h for sub in inner for h in _flat_hooks(sub)]


def offload_entry(model: nn.Module, param_name: str) -> tuple[Any, str] | None:
    """The offloading hook that loads parameter ``param_name`` for each forward and the parameter's key in the
    hook's ``weights_map``: a hook on its own module, else on the nearest ancestor that places its submodules."""
    parts = param_name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        for hook in _hf_hooks(model.get_submodule(".".join(parts[:i]))):
            owns = i == len(parts) - 1 or getattr(hook, "place_submodules", False)
            if owns and getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
                return hook, ".".join(parts[i:])
    return None


def param_values(model: nn.Module, param_name: str) -> torch.Tensor:
    """The values of parameter ``param_name`` of ``model``, also when accelerate offloads it: the parameter
    itself when it holds its values, else what the offloading hook loads for a forward (read from disk for a
    disk-offloaded one). Not to be written: see :func:`writable_param`. :class:`ModelError` for a parameter on
    the meta device that nothing offloads."""
    param = model.get_parameter(param_name)
    if not param.is_meta:
        return param
    entry = offload_entry(model, param_name)
    if entry is None:
        raise ModelError(f"{param_name} is on the meta device and holds no values (no accelerate hook offloads it)")
    hook, key = entry
    return hook.weights_map[key]


def module_weight(model: nn.Module, module_name: str) -> torch.Tensor:
    """The ``weight`` of module ``module_name``, also when offloaded (:func:`param_values`)."""
    return param_values(model, f"{module_name}.weight")


def writable_param(model: nn.Module, param_name: str) -> torch.Tensor | None:
    """The tensor whose change in place changes parameter ``param_name`` as forwards see it: the parameter when it
    holds its values, or the tensor an offloading hook keeps in memory and serves to every forward; ``None`` when
    the hook reads the values anew from disk on every forward (a file of the offload folder, or of the checkpoint
    itself, which is not to be written)."""
    param = model.get_parameter(param_name)
    if not param.is_meta:
        return param
    entry = offload_entry(model, param_name)
    if entry is None:
        return None
    hook, key = entry
    served = hook.weights_map[key]
    return served if hook.weights_map[key] is served else None


def execution_device(model: nn.Module, module_name: str) -> torch.device:
    """Where the forward of module ``module_name`` runs: its accelerate hook's ``execution_device``, else the
    device of its first tensor that holds values, else an ancestor hook's ``execution_device``, else the CPU.
    Unlike ``next(model.parameters()).device``, right for a model split across devices or offloaded."""
    module = model.get_submodule(module_name)
    device = _hook_device(module)
    if device is not None:
        return device
    tensor = next((t for t in chain(module.parameters(), module.buffers()) if not t.is_meta), None)
    if tensor is not None:
        return tensor.device
    parts = module_name.split(".") if module_name else []
    for i in range(len(parts) - 1, -1, -1):
        device = _hook_device(model.get_submodule(".".join(parts[:i])))
        if device is not None:
            return device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's ``input_ids`` go: the :func:`execution_device` of its input embedding."""
    embed = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is embed), "")
    return execution_device(model, name)


def _hook_device(module: nn.Module) -> torch.device | None:
    for hook in _hf_hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None
