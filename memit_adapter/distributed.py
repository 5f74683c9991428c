"""Several processes, one edit: MEMIT's work shared over the ranks of a ``torch.distributed`` process group.

MEMIT's parts distribute without changing the result. The second moments are sums: each rank runs the forward
passes of its share of the corpus and the sums and counts are all-reduced
(:func:`~memit_adapter.stats.collect_stats`). Each subject's target vector is optimised on its own: the subjects
are shared out and the z's gathered in order (:func:`~memit_adapter.targets.compute_targets`). The key passes
and the per-layer solves (cheap next to z) run on every rank alike, and rank 0's deltas are broadcast, so every
rank ends with the very same pack (:func:`~memit_adapter.engine.compute_edits`). Without a process group (or
with one rank) nothing here communicates and every function answers as for one process.

Usage (a script started by ``torchrun``; each rank loads the whole model)::

    from memit_adapter import compute_edits
    from memit_adapter.distributed import is_main, process_group, rank_device

    with process_group("cuda"):                            # NCCL for CUDA tensors, gloo for the rest
        model.to(rank_device("cuda"))                      # cuda:LOCAL_RANK
        pack = compute_edits(model, tok, requests, cfg, corpus=texts, cache_dir="mom2-cache")
        if is_main():                                      # every rank holds the same pack: rank 0 saves it
            pack.save_pretrained("my-edits")

The commands do this themselves: ``memit-adapter edit`` and ``memit-adapter stats`` started by ``torchrun`` join
its process group, and only rank 0 saves, pushes and prints.

One node with several GPUs (a rank per GPU; ``--device cuda`` means ``cuda:LOCAL_RANK``)::

    torchrun --nproc-per-node 8 -m memit_adapter.cli edit --model EleutherAI/gpt-j-6b --requests edits.jsonl \\
        --corpus wiki.jsonl --stats-cache mom2-cache --dtype bfloat16 --device cuda --out gptj-edits

Several nodes (run the same line on each node, ``--node-rank`` 0..N-1; ``host0`` reachable from all)::

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 --master-addr host0 --master-port 29500 \\
        -m memit_adapter.cli stats --model EleutherAI/gpt-j-6b --corpus wiki.jsonl --cache mom2-cache --device cuda

What runs where: rank r reads the texts r, r+W, r+2W, ... of the corpus (W ranks; the texts are already in
a seeded random order) and all ranks all-reduce the second moments; the subjects are dealt out the same
way (rank r: subjects r, r+W, ... in order of first appearance), each rank optimises their z's, and the
z's are all-gathered; every rank then runs the key passes and solves and keeps rank 0's deltas. A statistics
cache is read on every rank (a layer counts as cached only where every rank read it: give every node the same
folder, e.g. on a shared file system) and written by rank 0 alone; so is the pack (``--out`` on node 0).

Memory per rank: the whole model (each rank holds a copy), then the second moments of every edited layer,
``d_ff² x 4`` bytes a layer in float32 (x 2 in float64), each all-reduced in place on the GPU with NCCL (sums
kept on the host, as for an offloaded layer, are copied to the GPU while they are reduced) or on the host with
gloo: GPT-J (d_ff 16,384) 1 GiB a layer, 6 GiB for its layers 3-8; a 7B LLaMA (d_ff 11,008) 0.45 GiB a layer,
2.3 GiB for its layers 4-8. Then one chunk of the z optimisation, one key chunk and one layer's solve as in one
process (see :func:`~memit_adapter.engine.compute_edits`), the z chunks of this rank's share only.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
K = TypeVar("K")


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks of the default process group; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process saves, pushes and prints: rank 0, or the only process."""
    return rank() == 0


def shard(items: Sequence[T], of_rank: int | None = None) -> list[T]:
    """The share of rank ``of_rank`` (default: this rank) of ``items``: items r, r + W, r + 2W, ... (all of them
    in one process). Strided, so that every rank's share of a list in random order is a sample of all of it."""
    r = rank() if of_rank is None else of_rank
    return list(items[r::world_size()])


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if is_distributed():
        dist.barrier()


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where ``tensor`` takes part in a collective of the default group's backend: the current CUDA device when
    the group has NCCL (``nccl``, ``cpu:gloo,cuda:nccl``), the host for gloo, else its own device. Not where the
    tensor happens to be: the ranks must agree (one rank's statistics may live on the host, another's on a GPU)."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend:
        return torch.device("cpu")
    return tensor.device


def all_reduce_sum(tensors: Mapping[K, torch.Tensor]) -> dict[K, torch.Tensor]:
    """Each tensor summed over the ranks, on its own device (the same keys, in the same order, on every rank);
    the tensors themselves in one process."""
    if not is_distributed():
        return dict(tensors)
    out = {}
    for key, t in tensors.items():
        buf = t.to(_comm_device(t))
        dist.all_reduce(buf)
        out[key] = buf.to(t.device)
    return out


def sum_over_ranks(value: int) -> int:
    """``value`` summed over the ranks."""
    if not is_distributed():
        return value
    return int(all_reduce_sum({0: torch.tensor([value], dtype=torch.long)})[0].item())


def all_ranks(flags: Sequence[bool]) -> list[bool]:
    """Each flag true on every rank (a logical and over the ranks)."""
    if not is_distributed() or not flags:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.long)
    buf = t.to(_comm_device(t))
    dist.all_reduce(buf, op=dist.ReduceOp.MIN)
    return [bool(x) for x in buf.tolist()]


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor, in place, with rank ``src``'s (same shapes, dtypes and order on every rank)."""
    if not is_distributed():
        return
    for t in tensors:
        buf = t.to(_comm_device(t))
        dist.broadcast(buf, src=src)
        if buf is not t:
            t.copy_(buf)


def gather_rows(tensor: torch.Tensor, owned: Sequence[Sequence[int]]) -> torch.Tensor:
    """``tensor`` with every rank's rows filled in: rank r holds the valid rows ``owned[r]`` (indices into dim 0;
    its other rows are ignored), and the result, the same on every rank, holds row ``owned[r][j]`` from rank r.
    Shares may be uneven or empty; rows no rank owns keep this rank's values. ``tensor`` itself in one process."""
    if not is_distributed():
        return tensor
    device = _comm_device(tensor)
    width = max(len(o) for o in owned)
    mine = list(owned[rank()])
    local = torch.zeros((width, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    if mine:
        local[:len(mine)] = tensor[torch.tensor(mine, device=tensor.device)].to(device)
    parts = [torch.empty_like(local) for _ in owned]
    dist.all_gather(parts, local)
    out = tensor.clone()
    for rows, part in zip(owned, parts):
        if rows:
            out[torch.tensor(list(rows), device=out.device)] = part[:len(rows)].to(out.device)
    return out


def rank_device(device: str | None) -> str:
    """``device`` for this rank: plain ``cuda`` becomes ``cuda:LOCAL_RANK`` when started by ``torchrun``; any
    other device (``cpu``, ``cuda:1``) and ``None`` (the CPU) as they are."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device or "cpu"


@contextmanager
def process_group(device: str | None = None) -> Iterator[bool]:
    """Join the process group of a ``torchrun`` launch (``WORLD_SIZE`` > 1 in the environment) for the block,
    and leave it on exit; yields whether the work is distributed. For a CUDA ``device`` the group uses NCCL for
    CUDA tensors and gloo for host tensors (this rank's GPU, ``cuda:LOCAL_RANK``, made the current one); else
    gloo. A group already initialised (by the caller) is used as it is, and left to the caller; with NCCL, set
    this rank's GPU first (``torch.cuda.set_device``): the collectives here run on the current CUDA device. Such
    a caller should ``import torch._dynamo`` before ``init_process_group``: imported later (loading a model with
    transformers does), it keeps the group alive past ``destroy_process_group``, and the process may abort on exit."""
    start = (dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    if start:
        # torch._dynamo imported while a group exists (transformers' from_pretrained imports it) keeps a reference
        # to the group, so destroy_process_group cannot free it: its gloo threads then outlive the interpreter,
        # and one releasing a finished collective during shutdown aborts the process (SIGABRT, exit code -6)
        # after the work is done. Imported first, it holds none.
        importlib.import_module("torch._dynamo")  # (an import statement would make torch a local name here)
        cuda = device is not None and device.startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(torch.device(rank_device(device)))
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    try:
        yield is_distributed()
    except BaseException:
        if start:  # no barrier: the other ranks may never reach it
            dist.destroy_process_group()
        raise
    if start:  # rank 0 may still be saving: leaving the group before it does aborts the others' gloo threads
        dist.barrier()
        dist.destroy_process_group()
