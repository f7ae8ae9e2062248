"""The model thread of potion serve, without a model: jobs step in turn, a cancelled job stops, limits hold."""

import asyncio

import pytest

from potion.errors import PotionError
from potion.serve.worker import Busy, ModelWorker, ShuttingDown, single_step


def counting(name: str, n: int, order: list, closed: list | None = None):
    try:
        for i in range(n):
            order.append((name, i))
            yield i
        return name
    finally:
        if closed is not None:
            closed.append(name)


def run_jobs(worker: ModelWorker, *generators):
    """Submit the jobs before the thread starts (so they are all waiting), then gather their results."""

    async def go():
        jobs = [worker.submit(g) for g in generators]
        worker.start()
        try:
            return await asyncio.gather(*(job.result() for job in jobs), return_exceptions=True)
        finally:
            worker.stop()

    return asyncio.run(go())


def test_jobs_take_one_step_each_in_turn():
    order = []
    assert run_jobs(ModelWorker(), counting("a", 3, order), counting("b", 2, order)) == ["a", "b"]
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2)]


def test_beyond_max_active_a_job_waits_for_a_free_place():
    order = []
    assert run_jobs(ModelWorker(max_active=1), counting("a", 2, order), counting("b", 2, order)) == ["a", "b"]
    assert order == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]


def test_errors_reach_their_own_job_only():
    def failing():
        yield 1
        raise PotionError("the model's next-token scores are not finite")

    a, b, c = run_jobs(ModelWorker(), failing(), counting("b", 3, []), single_step(lambda: 1 / 0))
    assert isinstance(a, PotionError) and b == "b" and isinstance(c, ZeroDivisionError)


def test_a_cancelled_job_is_closed_before_its_next_step():
    order, closed = [], []

    async def go():
        worker = ModelWorker()
        worker.start()
        job = worker.submit(counting("a", 10**6, order, closed))
        await job.next_event()
        job.cancel()
        other = worker.submit(counting("b", 1, order))
        assert await other.result() == "b"
        worker.stop()

    asyncio.run(go())
    assert closed == ["a"] and len(order) < 10**6


def test_limits_and_shutdown_are_refusals():
    async def go():
        worker = ModelWorker(max_waiting=1)
        waiting = worker.submit(counting("a", 1, []))
        with pytest.raises(Busy, match="1 requests are already waiting"):
            worker.submit(counting("b", 1, []))
        worker.start()
        worker.stop()
        with pytest.raises(ShuttingDown):
            worker.submit(counting("c", 1, []))
        try:  # it ran before the stop, or was ended by it: either way its client hears, and is not left waiting
            return await asyncio.wait_for(waiting.result(), 5)
        except ShuttingDown:
            return "shut down"

    assert asyncio.run(go()) in ("a", "shut down")
