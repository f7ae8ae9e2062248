"""The one thread that runs the model, and the jobs requests become.

Every forward pass happens on this thread, so requests are serialised around the model and never share its KV
caches or its random state. A job is a generator: the thread takes one step of each active job in turn (one
token of a completion, or a whole explanation), so sixteen clients streaming at once each see tokens arrive
rather than waiting for the others to finish. Each step's value goes to the job's asyncio queue, which the
request handler reads on the server's event loop. A cancelled job (its client went away) is dropped before its
next step.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from potion.errors import PotionError

MAX_ACTIVE = 32  # jobs stepped in turn; each completion holds a KV cache while active
MAX_WAITING = 256  # beyond this a request is refused (503) rather than queued


@dataclass(frozen=True)
class Event:
    kind: str  # step | done | error
    value: object = None


class Busy(Exception):
    """More requests are waiting than MAX_WAITING."""


class ShuttingDown(Exception):
    """The server stopped before the job finished."""


class Job:
    """One request's work: steps is a generator run on the model thread; events arrive on the event loop."""

    def __init__(self, steps: Iterator, loop: asyncio.AbstractEventLoop):
        self.steps, self.loop = steps, loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()

    def deliver(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass

    def cancel(self) -> None:
        self.cancelled.set()

    async def next_event(self) -> Event:
        return await self.events.get()

    async def result(self):
        """The value the job's generator returns (its steps are skipped); an error event raises its exception."""
        while True:
            event = await self.events.get()
            if event.kind == "done":
                return event.value
            if event.kind == "error":
                raise event.value


def single_step(fn, *args, **kwargs) -> Iterator:
    """A job of one step that calls fn on the model thread; fn's value is the job's result."""
    return fn(*args, **kwargs)
    yield  # never reached: the yield makes this a generator, which is what the worker steps


class ModelWorker:
    def __init__(self, max_active: int = MAX_ACTIVE, max_waiting: int = MAX_WAITING):
        self.max_active, self.max_waiting = max_active, max_waiting
        self.waiting: deque[Job] = deque()
        self.active: deque[Job] = deque()  # touched by the model thread only; others read its length
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="potion-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, steps: Iterator) -> Job:
        job = Job(steps, asyncio.get_running_loop())
        with self.wake:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"{len(self.waiting)} requests are already waiting for the model; try again shortly")
            self.waiting.append(job)
            self.wake.notify()
        return job

    def stop(self, wait: bool = True, timeout: float = 10.0) -> None:
        """End every job (each gets a ShuttingDown error) and the thread, after the step it is taking."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if wait and self.thread.is_alive():
            self.thread.join(timeout)

    def counts(self) -> dict:
        return {"generating": len(self.active), "waiting": len(self.waiting)}

    def run(self) -> None:
        active = self.active
        while True:
            with self.wake:
                while not self.stopping and not active and not self.waiting:
                    self.wake.wait()
                if self.stopping:
                    break
                while self.waiting and len(active) < self.max_active:
                    active.append(self.waiting.popleft())
            if self.step(active[0]):  # the job stays in active while it steps: counts() includes it
                active.rotate(-1)
            else:
                active.popleft()
        for job in [*active, *self.waiting]:
            job.steps.close()
            job.deliver(Event("error", ShuttingDown("the server is shutting down")))

    @staticmethod
    def step(job: Job) -> bool:
        """Take one step of job and deliver what it gave; True while it has more steps."""
        if job.cancelled.is_set():
            job.steps.close()
            return False
        try:
            value = next(job.steps)
        except StopIteration as finished:
            job.deliver(Event("done", finished.value))
            return False
        except PotionError as e:
            job.deliver(Event("error", e))
            return False
        except Exception as e:  # a bug: this request fails with a 500, the server and other requests carry on
            traceback.print_exc(file=sys.stderr)
            job.deliver(Event("error", e))
            return False
        job.deliver(Event("step", value))
        return True
