"""Process-group set-up shared by the stages, and rank-0 logging.

Every stage runs under the DeepSpeed launcher (``deepspeed --include localhost:0,1 ...``) or as one plain
process. On a CPU-only machine DeepSpeed picks its CPU accelerator and the gloo backend by itself; its
``build_shm_op`` JIT-builds a shared-memory all-reduce op (30-45 s) and leaves a 66 MiB file per rank in
/dev/shm that is never removed, which no stage needs, so it is disabled before init.
"""

import logging
import os
import socket
import sys
from dataclasses import dataclass

import torch

logger = logging.getLogger("moe_ds")


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank, world size and local rank from the launcher's environment (one process when unset)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def disable_deepspeed_shm_op() -> None:
    """Stop DeepSpeed's CPU backend from JIT-building its shm all-reduce op (gloo does the collectives).

    Written exactly so: ``import deepspeed.comm.torch as x`` binds the torch module, not deepspeed's.
    """
    import deepspeed.comm.torch  # noqa: F401

    from .compat import require

    if require("deepspeed.comm.torch.build_shm_op", strict=False):  # else: nothing left to disable
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_distributed() -> DistInfo:
    """Initialise the process group when launched with more than one rank; a no-op for one process.

    Uses ``deepspeed.init_distributed`` (NCCL on GPUs, gloo on CPU) and disables the CPU shm op first.
    """
    info = dist_info()
    if info.world_size > 1 and not torch.distributed.is_initialized():
        if not torch.cuda.is_available():
            disable_deepspeed_shm_op()
        import deepspeed

        if torch.cuda.is_available():  # NCCL uses the current device: each rank its own
            torch.cuda.set_device(info.local_rank)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return info


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def collective_device() -> torch.device:
    """Where tensors handed to a collective must live: the rank's GPU under NCCL (it has no CPU backend),
    the CPU under gloo."""
    if _initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Barrier across ranks (on the rank's own GPU under NCCL); a no-op without a process group."""
    if _initialized():
        device = collective_device()
        torch.distributed.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks, computed on ``collective_device()``, returned on ``tensor``'s device and
    dtype (a copy; the input is unchanged). Without a process group: a copy of ``tensor``.

    The only way moe-ds reduces across ranks, so that no CPU tensor ever reaches NCCL.
    """
    out = tensor.to(collective_device(), copy=True)
    if _initialized():
        torch.distributed.all_reduce(out)
    return out.to(tensor.device)


def device_for(info: DistInfo) -> torch.device:
    """``cuda:LOCAL_RANK`` when a GPU is present, else CPU."""
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def setup_logging(info: DistInfo | None = None) -> None:
    """INFO logging, every line prefixed by ``[rank R]``."""
    info = info or dist_info()
    logging.basicConfig(level=logging.INFO, format=f"[rank {info.rank}] %(asctime)s %(message)s",
                        datefmt="%H:%M:%S", force=True)


def log_main(msg: str, *args) -> None:
    """Log on rank 0 only."""
    if dist_info().is_main:
        logger.info(msg, *args)


def free_port() -> int:
    """A free TCP port on localhost (for MASTER_PORT in tests and single-process runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
