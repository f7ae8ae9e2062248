"""Training on several processes and machines: torchrun's environment, the process group, DDP or FSDP2 around the
model, the one process that writes, and what every process must agree on at the same step.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) starts one process
per device; without those variables potion trains in one process exactly as before and nothing here runs.

- The config's batch is the global batch: every process draws the same random windows (one seeded generator, as
  one process would) and keeps its own rows, so 1 and N processes see the same tokens at every step.
- Only rank 0 writes (config, logs, plots, samples, probes, checkpoints) and shows progress. Weights and optimizer
  state are gathered into whole tensors for it, so a run directory is the same whatever the number of processes.
- A failure on one rank ends the job (session.py): the first rank to fail records it in the job's store (the
  key-value server torchrun set up) and reports it as one line; the others end quietly with the same exit code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from potion.errors import PotionError
from potion.hardware import available_memory
from potion.train.interrupt import StopRequest

# Long enough for rank 0's lone work between two collectives (writing a checkpoint); short enough that a process
# lost without a word (a machine gone) does not hold the others for torch's default half hour.
TIMEOUT = timedelta(minutes=10)
REPEAT_SECONDS = 2.0  # a Ctrl-C reaches every process from the terminal and again from torchrun: one request
FAILED = "failed"  # the store key the first failing rank claims
EXIT_CODE = 2  # a failed job's exit code on every rank, as for any PotionError
# The others outlive the failing rank by this much, so that torchrun names that rank as the root cause.
GRACE_SECONDS = 3.0  # the failing rank's own exit (interpreter, process group) took over 1 s at times


@dataclass(frozen=True)
class World:
    """This process's place in the job; one process that nothing launched is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # which device of its machine it uses
    local_size: int = 1  # processes on its machine
    backend: str = ""  # "" when not launched

    @property
    def launched(self) -> bool:
        return bool(self.backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_world = World()
_store = None  # the job's key-value store, under potion's own prefix


def world() -> World:
    return _world


def store():
    """The job's key-value store (under potion's own prefix), or None when not launched."""
    return _store


def is_main() -> bool:
    return _world.rank == 0


# ---------------------------------------------------------------- joining and leaving the job


def launched_environment() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def read_environment() -> World:
    """The job as torchrun's variables describe it, checked."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise PotionError(
            f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: start with torchrun, or set "
            "MASTER_ADDR and MASTER_PORT to rank 0's host and a free port"
        )
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError:
        raise PotionError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be whole numbers") from None
    if not (0 <= rank < size and 0 <= local_rank < local_size):
        raise PotionError(f"RANK {rank} of WORLD_SIZE {size} (LOCAL_RANK {local_rank}) is not a place in the job")
    return World(rank, size, local_rank, local_size)


def join() -> World:
    """Join the process group: NCCL for CUDA tensors and gloo for CPU ones (the stop vote, small objects), or gloo
    alone on a machine without CUDA."""
    global _world, _store
    joining = read_environment()
    backend = "gloo"
    if torch.cuda.is_available():
        if joining.local_rank >= torch.cuda.device_count():
            raise PotionError(
                f"LOCAL_RANK {joining.local_rank} but this machine has {torch.cuda.device_count()} GPU(s): start "
                "at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(joining.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        store, _, _ = next(dist.rendezvous("env://", timeout=TIMEOUT))
        dist.init_process_group(backend, store=store, rank=joining.rank, world_size=joining.size, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as e:  # torch's DistNetworkError and DistStoreError are RuntimeErrors
        raise PotionError(f"could not join the other processes at {address} ({first_line(e)})") from None
    _store = dist.PrefixStore("potion/", store)
    _world = replace(joining, backend=backend)
    return _world


def leave() -> None:
    global _world, _store
    if dist.is_initialized():
        dist.destroy_process_group()
    _world, _store = World(), None


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def failed_elsewhere(store, rank: int) -> bool:
    """Whether another rank has claimed the job's failure (a store error, the store gone, propagates)."""
    return store.check([FAILED]) and store.get(FAILED) != str(rank).encode()


def another_rank_failed() -> bool:
    try:
        return _store is not None and failed_elsewhere(_store, _world.rank)
    except (RuntimeError, OSError):
        return False


def end_quietly() -> None:
    """Another rank failed and reports it; this one stops without a word."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun tearing the job down: this exit code, not SIGTERM's
    time.sleep(GRACE_SECONDS)
    raise SystemExit(EXIT_CODE)


# ---------------------------------------------------------------- stopping together


class JobStopRequest(StopRequest):
    """A stop request in one process of a job: rank 0 announces it; the same Ctrl-C arriving twice (from the
    terminal and again from torchrun) is one request; a signal from torchrun tearing the job down after another
    rank failed ends this one quietly."""

    def __init__(self):
        super().__init__()
        self.announce = is_main()

    def on_signal(self, signum, frame) -> None:
        if another_rank_failed():
            end_quietly()
        if self.is_set() and time.monotonic() - self.first_signal_at < REPEAT_SECONDS:
            return
        super().on_signal(signum, frame)


def stop_request() -> StopRequest:
    return JobStopRequest.install() if _world.launched else StopRequest.install()


def agree_to_stop(request: StopRequest, out_of_time: bool) -> bool:
    """Whether any rank wants to stop now (a signal, or its clock past max_time): then all stop at this step, and
    every rank takes the signal as its own (its exit code names it). A CPU tensor: gloo, no wait on a GPU."""
    votes = torch.tensor([float(out_of_time or request.is_set()), float(request.signum or 0)])
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    if votes[1] and not request.is_set():  # another rank's signal: this rank's too, from now
        request.signum, request.first_signal_at = int(votes[1]), time.monotonic()
        request.set()
    return bool(votes[0])


# ---------------------------------------------------------------- sharing numbers and small objects


def mean(value: float) -> float:
    """The mean over ranks of a number each measured on its own rows (every rank has as many)."""
    if not _world.launched:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total) / _world.size


def average_(tensor: torch.Tensor) -> torch.Tensor:
    """In place, the mean over ranks of a tensor on the training device (no host sync on a GPU)."""
    if _world.launched:
        dist.all_reduce(tensor)
        tensor /= _world.size
    return tensor


def from_main(make):
    """make() on rank 0, and its result (a path, a name: small and plain) on every rank."""
    if not _world.launched:
        return make()
    box = [make() if _world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def in_turn(make):
    """make() on rank 0 first, then on each other machine's first process, then on the rest: the first tokenizes
    the corpus into the cache, and the others on its machine find it there. Waits go through the store, which
    has no timeout: tokenizing a large corpus takes longer than a collective may wait."""
    if not _world.launched:
        return make()
    machines = _world.size // _world.local_size
    turns = [
        (_world.rank == 0, 1),
        (_world.local_rank == 0 and _world.rank != 0, machines - 1),
        (_world.local_rank != 0, _world.size - machines),
    ]
    result = None
    for i, (mine, count) in enumerate(turns):
        if mine:
            result = make()
            _store.add(f"turn{i}", 1)
        while _store.add(f"turn{i}", 0) < count:
            time.sleep(0.05)
    return result


def gather_objects(mine) -> list | None:
    """Every rank's object, in rank order, on rank 0 (None elsewhere)."""
    if not _world.launched:
        return [mine]
    everyone = [None] * _world.size if _world.is_main else None
    dist.gather_object(mine, everyone, dst=0)
    return everyone


# ---------------------------------------------------------------- the rows of a batch


def check_batch(batch_size: int) -> None:
    if batch_size % _world.size:
        raise PotionError(
            f"train.batch_size ({batch_size}) must be divisible by the number of processes ({_world.size}): each "
            "takes an equal part of every batch",
            setting="batch_size",
        )


def my_rows(batch_size: int) -> slice:
    """This rank's rows of every global batch."""
    part = batch_size // _world.size
    return slice(_world.rank * part, (_world.rank + 1) * part) if _world.launched else slice(None)


# ---------------------------------------------------------------- the model across processes


def choose_parallel(setting: str, model: torch.nn.Module, device: torch.device) -> str:
    """ddp or fsdp as asked; auto: ddp while the weights, gradients and AdamW's two moments (16 bytes a parameter)
    take at most half of one process's memory (its GPU, or its share of the machine's memory), else fsdp."""
    if setting != "auto":
        return setting
    need = 16 * sum(p.numel() for p in model.parameters())
    return "ddp" if need <= device_memory(device) / 2 else "fsdp"


def device_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    available = available_memory()
    return float("inf") if available is None else available / _world.local_size


def parallelize(model: torch.nn.Module, setting: str, device: torch.device, dtype: torch.dtype):
    """(the module the steps call, ddp | fsdp | "" alone). DDP keeps a whole copy on every rank and averages the
    gradients; FSDP2 shards each block, and then the rest, over the ranks (in bf16 where training is bf16, with
    gradients averaged in fp32). Every rank built the same weights from the same seed and files."""
    if not _world.launched:
        return model, ""
    kind = choose_parallel(setting, model, device)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None), kind
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (_world.size,))
    precision = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)
    return model, kind


def gradient_sync(module: torch.nn.Module, sync: bool):
    """A context in which backward averages the gradients over ranks (sync) or only accumulates them: the
    micro-steps before the last of a gradient accumulation need no all-reduce."""
    if hasattr(module, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def own_device(device: torch.device) -> torch.device:
    """This process's device: with several processes on CUDA, the GPU of its LOCAL_RANK."""
    if not _world.launched:
        return device
    if device.type == "mps":
        raise PotionError("several processes cannot share one MPS device; train in one process, or on CPU or CUDA")
    return torch.device("cuda", _world.local_rank) if device.type == "cuda" else device
