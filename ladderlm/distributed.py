"""Parallelism, apart from the training loop: one process, or DistributedDataParallel under torchrun.

`torchrun --nproc_per_node=N -m ladderlm train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; then
every rank joins a process group (nccl on CUDA, gloo on CPU), draws the same global batch of
batch_size * world rows from the shared seeded generator and trains on its own slice of it, so
that the global batch per optimizer step is batch_size * world * grad_accum windows whatever N is.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import LadderError


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """The device `name` (auto, cpu, cuda, cuda:N, mps) names, checked to exist; `option` is what set it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise LadderError(f"{option}={name} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LadderError(f"{option}={name} but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LadderError(f"{option}={name} but there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LadderError(f"{option}={name} but MPS is not available")
    return device


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0 alone logs, writes metrics and checkpoints."""
        return self.rank == 0

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over ranks (identity in one process)."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world
        return t

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank: a collective, every rank gets the same answer."""
        if self.world == 1:
            return flag
        t = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: object) -> list:
        """Every rank's `obj`, in rank order, on every rank (`[obj]` in one process)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, work: Callable[[], object]) -> None:
        """Run `work` (files: logs, checkpoints) on rank 0 alone. If it fails every rank raises its error,
        where the others would wait for rank 0 in their next collective until a timeout."""
        error = None
        if self.main:
            try:
                work()
            except (LadderError, OSError) as e:
                error = e
        if self.world > 1:
            error = self.gather(error)[0]
        if error is not None:
            raise error

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wrap(self, model: nn.Module, find_unused: bool = False) -> nn.Module:
        """DDP over `model`; `find_unused`: some parameters get no gradient (DDP then searches the graph every step)."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)

    def no_sync(self, model: nn.Module, last_micro_step: bool):
        """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
        return nullcontext() if self.world == 1 or last_micro_step else model.no_sync()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            # The DDP wrapper keeps the group alive from reference cycles; left to the interpreter's exit, gloo's
            # threads die after Python does and abort the process ("terminate called without an active exception").
            gc.collect()
            dist.destroy_process_group()


def world_size() -> int:
    """The processes torchrun started (WORLD_SIZE), 1 without it."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise LadderError(f"WORLD_SIZE must be a positive integer, got {text!r}")
    return int(text)


def init(device_name: str) -> Dist:
    """One process, or join the process group that torchrun describes in the environment."""
    world = world_size()
    device = resolve_device(device_name)
    if world == 1:
        return Dist(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def autocast(device: torch.device, precision: str):
    """bf16 autocast with fp32 master weights, or nothing; `auto` is bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
