"""Stand-in for transformers' `tests/distributed_testing_utils.py`, which the sdist does not ship.

Since 5.23, `test_fsdp_mixin.py` and `test_tensor_parallel_mixin.py` (and `test_expert_parallel_mixin.py`)
import their process helpers from it. This module implements what they use, with the semantics their
call sites need:

* `run_distributed(world_size)(func)(*args, **kwargs)`: starts `world_size` rank processes (spawn), each
  joins one process group (gloo on CPU, the accelerator's backend otherwise), runs
  `func(rank, *args, **kwargs)`, then meets the others at a barrier and leaves the group. An exception
  in a rank fails the caller with that rank's traceback.
* `_start_rank_processes(fn, args=(...), nprocs=N)`: `torch.multiprocessing.spawn` semantics, `fn(rank, *args)`;
  the FSDP mixin's own wrapper sets up the group.
* `_get_distributed_device_type()`, `_get_distributed_backend()`, `_get_rank_device(rank)`,
  `_set_rank_device(rank)`: the device and backend of each rank.

`func` and `fn` are pickled by reference, so they must be module-level functions importable in the
rank processes (the mixins' `_test_*_impl` functions are).
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Backends of the accelerators torch.distributed knows; anything else (and the CPU) uses gloo.
_BACKENDS = {"cuda": "nccl", "xpu": "xccl", "hpu": "hccl", "npu": "hccl", "mlu": "cncl", "musa": "mccl"}


def _get_distributed_device_type() -> str:
    """The device type the ranks run on: the current accelerator's, the CPU where there is none (or MPS,
    which torch.distributed cannot use)."""
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    device_type = accelerator.type if accelerator is not None else "cpu"
    return "cpu" if device_type == "mps" else device_type


def _get_distributed_backend() -> str:
    return _BACKENDS.get(_get_distributed_device_type(), "gloo")


def _get_rank_device(rank: int) -> torch.device:
    device_type = _get_distributed_device_type()
    return torch.device("cpu") if device_type == "cpu" else torch.device(device_type, rank)


def _set_rank_device(rank: int) -> None:
    device_type = _get_distributed_device_type()
    module = getattr(torch, device_type, None) if device_type != "cpu" else None
    if module is not None and hasattr(module, "set_device"):
        module.set_device(rank)


def _start_rank_processes(fn, args=(), nprocs=1):
    """Run `fn(rank, *args)` in `nprocs` spawned processes and wait for all; raises if one fails."""
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="spawn")


def _rank_entry(rank, world_size, store_host, store_port, func, args, kwargs):
    os.environ.update(
        WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR=store_host,
        MASTER_PORT=str(store_port),
    )  # fmt: skip
    _set_rank_device(rank)  # some backends need the device before the group exists
    store = dist.TCPStore(store_host, store_port, world_size=None, is_master=False)
    dist.init_process_group(backend=_get_distributed_backend(), store=store, rank=rank, world_size=world_size)
    try:
        func(rank, *args, **kwargs)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(world_size: int):
    """Decorator factory: `run_distributed(n)(func)(*args, **kwargs)` runs `func(rank, *args, **kwargs)`
    on `n` ranks of one process group and returns when all have finished."""

    def decorator(func):
        def wrapper(*args, **kwargs):
            # The parent owns the rendezvous store (port 0: the OS picks a free one), so no port can be
            # taken by someone else between choosing and binding it.
            store = dist.TCPStore("localhost", 0, world_size=None, is_master=True, wait_for_workers=False)
            try:
                _start_rank_processes(
                    _rank_entry, args=(world_size, store.host, store.port, func, args, kwargs), nprocs=world_size
                )
            finally:
                del store

        wrapper.__name__ = getattr(func, "__name__", "run_distributed")
        return wrapper

    return decorator
