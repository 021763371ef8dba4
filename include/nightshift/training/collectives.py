"""Collectives of CPU ranks on one machine through DeepSpeed's shared-memory kernel instead of gloo's TCP.

ZeRO reduces every gradient and gathers every parameter each step; over gloo (TCP on loopback) that is the
bottleneck of CPU training: on SmolLM2-135M with two ranks, a 540 MB all-reduce takes 0.47 s and the
all-gather of the updated parameters 0.94 s, against 0.27 s for the same all-reduce through the
shared-memory all-reduce DeepSpeed builds for CPU ranks (``deepspeed_shm_comm_op``, used by its inference
engine; bench/train_throughput.py). This module routes the synchronous world-group SUM all-reduces and
all-gathers of float32 tensors through that kernel (an all-gather is a zero-filled all-reduce, exact in
floating point: x + 0 = x) and leaves every other call to gloo. It applies only when every rank is on this
machine and DeepSpeed's kernel is there; GPU ranks never use it.
"""

from __future__ import annotations

import os
from typing import Any


def local_world_size() -> int:
    """Return how many ranks run on this machine (DeepSpeed's launcher says LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE)."""
    for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def route_through_shared_memory() -> bool:
    """Patch the DeepSpeed communication backend of this process; return whether it was patched."""
    import torch
    import torch.distributed as dist
    from deepspeed import comm as ds_comm

    backend = ds_comm.comm.cdb
    kernel = getattr(getattr(torch.ops, "deepspeed", None), "inference_all_reduce_", None)
    local = local_world_size()
    world = dist.get_world_size()
    if backend is None or kernel is None or local != world or world < 2 or \
            getattr(backend, "shm_vector_kernel_level", 0) < 1:
        return False
    rank = dist.get_rank()
    sum_op = torch.distributed.ReduceOp.SUM
    original_all_reduce = backend.all_reduce
    original_all_gather = backend.all_gather_into_tensor

    def whole_world(group: Any) -> bool:
        return group is None or dist.get_world_size(group) == world

    def fits(tensor: Any) -> bool:
        return tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous()

    def all_reduce(tensor, op=sum_op, group=None, async_op=False):
        if not async_op and whole_world(group) and fits(tensor) and backend._reduce_op(op) == sum_op:
            kernel(tensor)
            return None
        return original_all_reduce(tensor, op=op, group=group, async_op=async_op)

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        n = input_tensor.numel()
        if not async_op and whole_world(group) and fits(output_tensor) and input_tensor.dtype == torch.float32 \
                and output_tensor.numel() == n * world:
            flat = output_tensor.view(-1)
            mine = flat.narrow(0, rank * n, n)
            source = input_tensor.reshape(-1)
            if source.data_ptr() != mine.data_ptr():  # ZeRO often gathers in place: input is output's slice
                if source.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr():
                    source = source.clone()
                mine.copy_(source)
            flat.narrow(0, 0, rank * n).zero_()
            flat.narrow(0, (rank + 1) * n, (world - rank - 1) * n).zero_()
            kernel(output_tensor)
            return None
        return original_all_gather(output_tensor, input_tensor, group=group, async_op=async_op)

    backend.all_reduce = all_reduce
    backend.all_gather_into_tensor = all_gather_into_tensor
    return True
