"""Running under torchrun: process-group set-up from the environment and the few collectives the loop needs.

`torchrun --nproc_per_node=N script.py` sets RANK, WORLD_SIZE and LOCAL_RANK; `init_from_env` starts the
process group (nccl on CUDA, gloo on CPU) and says which rank this is. With WORLD_SIZE unset or 1, every
function here is a no-op and the engine runs as one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(use_cuda: bool, timeout_s: int = 1800) -> DistInfo:
    """Start the process group torchrun describes; a collective that waits over `timeout_s` raises, naming it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def all_sum(values: list[float], info: DistInfo, device) -> list[float]:
    """Sum numbers over ranks (float64, one all-reduce)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full(tensor):
    """A DTensor (FSDP2 shard) gathered to a plain tensor; plain tensors pass through."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def shard_fsdp(model) -> None:
    """FSDP2: shard every block of each layer stack (a ModuleList of modules with parameters), then the rest."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                if any(True for _ in block.parameters()):
                    fully_shard(block)
    fully_shard(model)


def wrap(model, info: DistInfo, fsdp: bool, device) -> tuple[object, bool]:
    """(the module the step calls, sharded?): the model itself in one process; under torchrun a
    DistributedDataParallel wrapper (only trainable tensors are registered, so frozen ones need no unused-parameter
    search), or, with `fsdp`, the model itself sharded in place by FSDP2."""
    if not info.enabled:
        return model, False
    if fsdp:
        shard_fsdp(model)
        return model, True
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.local_rank] if device.type == "cuda" else None), False


def accumulation_sync(model, info: DistInfo, sharded: bool, last: bool):
    """Gradients are reduced across ranks once per accumulation window, on its last micro-batch."""
    import contextlib

    if sharded:
        model.set_requires_gradient_sync(last)
    elif info.enabled and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def full_state_dict(model) -> dict:
    """The whole model's state dict on rank 0 (CPU tensors), gathered from the shards; empty elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer's whole state on rank 0 (CPU tensors), gathered from FSDP shards, in the layout of a
    plain `optimizer.state_dict()` (per-parameter state keyed 0, 1, ... in group order); empty elsewhere.

    torch's gathered optimizer state is keyed by parameter name; renumbering it makes an FSDP checkpoint's
    optimizer file the same as a one-process one.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:
        return {}
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    groups, start = [], 0
    for group in state["param_groups"]:
        groups.append({**group, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def load_full_state(model, optimizer, model_tensors: dict, optimizer_state: dict) -> None:
    """Put full (unsharded) model tensors and a plain-layout optimizer state into an FSDP-sharded model and
    its optimizer: every rank passes the same full values and keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_tensors, options=options)
    names = [name for group in optimizer.param_groups for name in group["names"]]
    groups = [{**saved, "params": list(group["names"])}
              for saved, group in zip(optimizer_state["param_groups"], optimizer.param_groups)]
    state = {names[i]: value for i, value in optimizer_state["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=options)
