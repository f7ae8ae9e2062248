"""One command as one process of a torchrun job: join, run, and end together, also when a rank fails.

A failure on one rank ends the job: the first rank to fail records it in the job's store and reports it as one
line; a thread in every other rank watches that key and ends its process quietly, with the same exit code, within
a second, whatever collective it is waiting in.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings

import torch.distributed as dist

from potion.errors import PotionError
from potion.parallel.world import (
    EXIT_CODE,
    FAILED,
    GRACE_SECONDS,
    end_quietly,
    failed_elsewhere,
    first_line,
    join,
    launched_environment,
    leave,
    store,
    world,
)

WATCH_SECONDS = 0.5  # how often the other ranks look for a failure
# How gloo says, in a collective, that another process is gone (killed, out of memory, its machine lost).
LOST_PROCESS = ("Connection closed by peer", "Connection reset by peer", "remote worker")


@contextlib.contextmanager
def session():
    """Run a command as one process of the job torchrun started (or alone, when nothing did).

    When the command fails, the first rank to fail reports its error (one line, as always) and the others end
    quietly with the same exit code; when it succeeds, every rank waits for the others, so that none reports
    success while rank 0 is still writing.
    """
    if not launched_environment():
        yield world()
        return
    joined = join()
    if not joined.is_main:  # the other ranks print nothing but errors
        warnings.showwarning = lambda *args, **kwargs: None
    watch = FailureWatch(store(), joined.rank)
    watch.start()
    try:
        yield joined
        dist.barrier()
    except Exception as e:
        watch.stop()
        if watch.saw_failure.is_set() or not first_to_fail():  # another rank failed first and reports it
            end_quietly()
        hold_the_store()
        if isinstance(e, RuntimeError) and any(words in str(e) for words in LOST_PROCESS):
            raise PotionError(
                f"another process of this training ended without a word (killed, out of memory, or its machine "
                f"lost; rank {joined.rank} of {joined.size} saw: {first_line(e)}); continue from the last "
                "checkpoint with --resume"
            ) from None
        if isinstance(e, PotionError) and not joined.is_main:
            raise PotionError(f"rank {joined.rank} of {joined.size}: {e}", setting=e.setting) from None
        raise
    watch.stop()
    leave()


def hold_the_store() -> None:
    """Rank 0 holds the job's store unless torchrun's agent does (a plain launcher: srun, mpirun). Having claimed
    the failure, it stays long enough for the other ranks' watches to read the claim there: once it exits, the store
    is gone, and they would report only a lost connection."""
    if world().rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        time.sleep(2 * WATCH_SECONDS)


def first_to_fail() -> bool:
    """Claim the job's failure for this rank; False when another rank claimed it first (and reports it)."""
    mine = str(world().rank).encode()
    try:
        return store().compare_set(FAILED, "", mine) == mine
    except (RuntimeError, OSError):  # the store is gone: nobody else can have reported
        return True


class FailureWatch(threading.Thread):
    """Ends this process when another rank has failed: its main thread may be waiting in a collective that will
    never complete (NCCL waits for its timeout; gloo notices a closed connection, but only on its next message)."""

    def __init__(self, store, rank: int):
        super().__init__(name="potion-failure-watch", daemon=True)
        self.store, self.rank, self.stopped = store, rank, threading.Event()
        self.saw_failure = threading.Event()  # for the main thread, should its collective fail meanwhile

    def run(self) -> None:
        while not self.stopped.wait(WATCH_SECONDS):
            try:
                failed = failed_elsewhere(self.store, self.rank)
            except (RuntimeError, OSError):  # the store has closed: the job is ending, and says so itself
                return
            if failed:
                self.saw_failure.set()
                sys.stdout.flush()
                sys.stderr.flush()
                time.sleep(GRACE_SECONDS)
                os._exit(EXIT_CODE)  # the main thread is stuck in a collective: only a hard exit ends it

    def stop(self) -> None:
        """Stop watching, and wait until the last look at the store is over: a thread still inside the store's
        C++ client while the process group is torn down and the process exits can abort it."""
        self.stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2 * WATCH_SECONDS)
