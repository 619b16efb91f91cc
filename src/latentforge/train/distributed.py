"""Data-parallel training on several processes (started by ``torchrun``), equal to one process.

``torchrun --nproc_per_node N latentforge train CONFIG`` starts N copies of the command with RANK,
WORLD_SIZE and LOCAL_RANK in their environment (PyTorch's ``torch.distributed.run`` contract).
``batch_size`` stays the global batch: every rank computes the same global batch of indices and draws
the same random numbers from the same per-(step, micro-batch) generator (noise, timesteps, caption
dropout and tag shuffling, LoRA dropout), then keeps only its contiguous slice of the examples, so
example i of the global batch gets the same noise whichever rank computes it. Each rank's loss is the
sum over its slice divided by the global batch size; after the micro-batches the gradients are summed
over the ranks (an explicit all-reduce, as DDP's averaging but with the normalisation done by the loss),
which gives the gradient of the global mean loss. Clipping, the divergence checks, the optimizer and the
EMA then see identical values on every rank, so the weights stay identical without broadcasts. Only
rank 0 writes (states, checkpoints, samples) and logs; the written files are the single-process ones.

Backends: gloo for CPU training, NCCL when ``device`` is CUDA (each rank on ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from latentforge.train.config import ConfigError, TrainConfig

log = logging.getLogger("latentforge")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_BUCKET = 1 << 24  # gradient elements reduced per all-reduce (64 MiB of float32)


@dataclass
class Distributed:
    """Where this process stands: its rank among ``world`` processes and its device. ``world == 1``
    (no torchrun) makes every collective a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this object initialised the process group (and destroys it)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    def part(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` examples (rank r: [r*count//W, (r+1)*count//W))."""
        return slice(self.rank * count // self.world, (self.rank + 1) * count // self.world)

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over all ranks, in place. A parameter with no gradient on any
        rank keeps none (as in one process, so AdamW skips it); one with a gradient somewhere gets zeros
        where it had none."""
        if self.world == 1:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [p for p, h in zip(params, has.tolist()) if h]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for p in live:
            if bucket and (size + p.grad.numel() > _BUCKET or p.grad.dtype != bucket[0].dtype):
                _reduce_bucket(bucket)
                bucket, size = [], 0
            bucket.append(p.grad)
            size += p.grad.numel()
        if bucket:
            _reduce_bucket(bucket)

    def sum(self, value: float) -> float:
        """``value`` summed over the ranks (in float64)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def close(self, ok: bool = True) -> None:
        """The end of a run. After a run that ended normally (``ok``) wait for every rank, so that rank 0's
        files exist when any rank returns; after an error never wait (the other ranks may be inside
        another collective; torchrun stops them when this process exits). Then end the process group if
        this object started it."""
        if self.world == 1 or not dist.is_initialized():
            return
        try:
            if ok:
                dist.barrier()
        finally:
            if self.owns_group:
                dist.destroy_process_group()
                self.owns_group = False


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def launch_environment() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment variables, or None outside torchrun.
    Malformed values raise ConfigError naming the variable."""
    if "WORLD_SIZE" not in os.environ:
        return None
    values = []
    for name in _ENV:
        text = os.environ.get(name, "0" if name == "LOCAL_RANK" else "")
        try:
            values.append(int(text))
        except ValueError:
            raise ConfigError(
                f"environment variable {name}={text!r} is not an integer; start several processes with "
                "torchrun --nproc_per_node N latentforge train CONFIG (which sets RANK, WORLD_SIZE, LOCAL_RANK)"
            ) from None
    rank, world, local = values
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(
            f"environment RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE "
            "and LOCAL_RANK >= 0 (as torchrun sets them)"
        )
    return rank, world, local


def check_batch(cfg: TrainConfig, world: int) -> None:
    """``batch_size`` is the global batch: it must divide by the number of processes."""
    if cfg.batch_size % world:
        lower = cfg.batch_size // world * world
        options = f"batch_size = {lower} or {lower + world}" if lower else f"batch_size = {world}"
        raise ConfigError(
            f"config key 'batch_size' = {cfg.batch_size} is the global batch and must divide by the number of "
            f"processes ({world}, torchrun --nproc_per_node): use {options}, or another process count"
        )


def setup(cfg: TrainConfig) -> Distributed:
    """The process's place in the run: a single process without torchrun, else rank/world from the
    environment with the process group initialised (gloo on CPU, NCCL on CUDA). The batch size is
    checked before any connection is made, so a bad config fails at once on every rank."""
    env = launch_environment()
    device = torch.device(cfg.device)
    if env is None or env[1] == 1:
        return Distributed(device=device)
    rank, world, local = env
    check_batch(cfg, world)
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"config key 'device' = {cfg.device!r} names one GPU for all {world} processes: set device = 'cuda' "
                "(each process then uses cuda:LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, rank=rank, world_size=world)
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise ConfigError(f"a process group of another shape is already initialised (rank {dist.get_rank()})")
    return Distributed(rank, world, local, device, owns)


def check_resume(extra: dict, ctx: Distributed) -> None:
    """A state saved by another number of processes resumes to the same result up to float summation
    order, not bit for bit: say so (the state records ``world_size``; states without it were 1)."""
    saved = extra.get("world_size", 1)
    if saved != ctx.world:
        log.warning(
            "the training state was saved by a run on %s process(es) and resumes on %d: the result equals an "
            "uninterrupted run within float tolerance, not bit for bit (resume with the same count for that)",
            saved,
            ctx.world,
        )


class quiet_unless_main:
    """Within the block, the ``latentforge`` logger shows only errors on ranks other than 0."""

    def __init__(self, ctx: Distributed):
        self.ctx, self.level = ctx, None

    def __enter__(self) -> quiet_unless_main:
        if not self.ctx.main:
            self.level = log.level
            log.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc) -> None:
        if self.level is not None:
            log.setLevel(self.level)
