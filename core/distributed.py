"""Process setup for one device or many (`torchrun` + DistributedDataParallel)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from typing import Iterator

import torch
import torch.distributed as dist

from core.cli import ReportedByAnotherProcess, die_with_the_launcher, launched_rank, launched_world_size
from core.errors import UserError
from core.runtime import Runtime, resolve_device


_host_group = None  # set by `setup` when the main group is NCCL


def setup(device: str = "auto") -> Runtime:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone."""
    world_size = launched_world_size()
    if world_size == 1:
        return Runtime(resolve_device(device))
    die_with_the_launcher(signal.SIGKILL)  # (done at start-up by entry points that call cli.catch_early_sigterm)
    rank = launched_rank()
    run_device = process_device(device, int(os.environ.get("LOCAL_RANK", "0")),
                                int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    backend = "nccl" if run_device.type == "cuda" else "gloo"
    if run_device.type == "cuda":
        torch.cuda.set_device(run_device)
    if not dist.is_initialized():
        if _launcher_gone():  # joining would wait half an hour for a store no one serves
            raise UserError("this worker's torchrun launcher ended before the job started; start the job again.")
        dist.init_process_group(backend)
    die_with_the_launcher(signal.SIGTERM)  # joined: from now on a dead launcher stops this worker after its step
    global _host_group
    # A CPU-side group for the small decisions the loop takes every step (whether to stop), so they
    # never synchronise the GPU; under gloo the default group already is one.
    _host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return Runtime(run_device, rank, world_size)


def process_device(device: str, local_rank: int, local_processes: int = 1) -> torch.device:
    """The device of the torchrun process of `local_rank` (its rank on this machine, one of `local_processes`) for
    `--device`: the GPU of that number for cuda, and for auto where there is a GPU; else the CPU. Refused as
    alone (an unknown name, cuda without a GPU), and besides: a GPU named by number (every process would take
    it), and more processes on this machine than it has GPUs. Every refusal is one that every process makes
    alike, so the job ends together and rank 0 alone says it."""
    try:
        wanted = resolve_device(device)
        if wanted.type == "cuda":
            if wanted.index is not None:
                raise UserError(f"--device {device} names one GPU, but under torchrun each process takes the GPU of "
                                f"its local rank; pass --device cuda (or auto), and choose the GPUs with "
                                f"CUDA_VISIBLE_DEVICES.")
            processes, gpus = max(local_processes, local_rank + 1), torch.cuda.device_count()
            if processes > gpus:
                raise UserError(f"torchrun started {processes} processes on this machine, more than its {gpus} "
                                f"CUDA GPU(s); pass --nproc_per_node {gpus} or fewer.")
    except UserError as err:
        err.every_process = True  # every process checks the same: rank 0 says it
        raise
    return torch.device("cuda", local_rank) if wanted.type == "cuda" else wanted


def _launcher_gone() -> bool:
    """Whether the store that torchrun's launcher serves (its agent's, which every worker joins) refuses us: it is
    up before any worker starts, so a refusal means the launcher died, maybe before this worker could ask to die
    with it (`cli.die_with_the_launcher`). False wherever that cannot be told (another launcher, another store)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return False
    try:
        socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), timeout=10).close()
    except ConnectionRefusedError:
        return True
    except (OSError, KeyError, ValueError):
        return False
    return False


def _largest(number: int) -> int:
    """The largest of every process's `number`, all-reduced on the host group (no GPU synchronisation)."""
    value = torch.tensor([number], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group)
    return int(value)


class StopAgreement:
    """Which stop signal every process of the job stops for, asked after each step, without making a step wait.

    Alone, a signal stops the run after the step it arrived in. Under torchrun a signal can reach only some
    processes, or reach them in different steps, yet every process must stop after the same step (the
    checkpoint that follows has collectives of its own). So each process hands the signal it holds (0: none)
    to a MAX all-reduce on the host group, and reads the result only after its next step: the round trip
    (about 1 ms over gloo's loopback) runs in the background while that step computes, and the job stops
    together one step after the signal. At the run's last step, with no next step to hide it behind, the
    agreement is made at once. `python -m bench.stop_agreement` measures what each way costs a step.
    """

    def __init__(self, runtime: Runtime):
        self.distributed = runtime.distributed
        self._pending: tuple[torch.Tensor, dist.Work] | None = None  # the all-reduce started after the last step

    def after_step(self, received: list[int], last: bool) -> int | None:
        """The signal to stop for now, or None; `received`: the signals this process has caught (in order),
        `last`: whether the step just taken is the run's last. Every process must call this after every step."""
        mine = received[0] if received else 0
        if not self.distributed:
            return mine or None
        agreed = 0
        if self._pending is not None:
            value, work = self._pending
            work.wait()
            agreed, self._pending = int(value), None
        if agreed or last:
            return agreed or _largest(mine) or None
        value = torch.tensor([mine], dtype=torch.int64)
        self._pending = value, dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group, async_op=True)
        return None


def any_process(flag: bool, runtime: Runtime) -> bool:
    """Whether `flag` holds in any process of the job (`flag` itself without torchrun), so that every process
    takes the same branch after a decision each made from what it sees."""
    return bool(_largest(int(flag))) if runtime.distributed else flag


@contextlib.contextmanager
def together(runtime: Runtime) -> Iterator[None]:
    """A block every process of a torchrun job runs (the start-up checks: the lock, the options, the
    resolved config; then building the stage: its data, models and caches), with no collective inside
    but `main_process_first`'s. If it fails in any process, the lowest-ranked failing one raises its
    error and reports it, and the others stop quietly (`ReportedByAnotherProcess`), rather than running
    on to a collective the failed process never joins, or printing the same line once per process."""
    if not runtime.distributed:
        yield
        return
    try:
        yield
    except BaseException:
        if _first_failure(runtime, failed=True) != runtime.rank:
            raise ReportedByAnotherProcess("another process of this torchrun job failed and reported why") from None
        raise
    if _first_failure(runtime, failed=False) is not None:
        raise ReportedByAnotherProcess("another process of this torchrun job failed and reported why")


@contextlib.contextmanager
def main_process_first(runtime: Runtime) -> Iterator[None]:
    """Run the body on the main process first and on the others after it, e.g. to build a cache once and
    then read it everywhere (a no-op without torchrun). If the body fails on the main process, the others
    skip it and stop quietly: the main process's error is the one reported (inside `together`, which it
    keeps in step)."""
    if not runtime.distributed:
        yield
        return
    if not runtime.is_main:
        if _first_failure(runtime, failed=False) is not None:  # waits for the main process's outcome
            raise ReportedByAnotherProcess("the main process of this torchrun job failed and reported why")
        yield
        return
    try:
        yield
    except BaseException:
        _first_failure(runtime, failed=True)
        raise
    _first_failure(runtime, failed=False)


def _first_failure(runtime: Runtime, failed: bool) -> int | None:
    """The lowest rank that reports a failure (this one if `failed`), agreed on the host; None if none did."""
    value = torch.tensor([runtime.rank if failed else runtime.world_size], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=_host_group)
    return None if int(value) == runtime.world_size else int(value)


def teardown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def mean_across_processes(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= runtime.world_size
    return value


def gather_across_processes(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Every process's `value`, stacked in rank order (just `value[None]` without torchrun)."""
    if not runtime.distributed:
        return value[None]
    parts = [torch.empty_like(value) for _ in range(runtime.world_size)]
    dist.all_gather(parts, value.contiguous())
    return torch.stack(parts)
