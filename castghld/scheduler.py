"""The step scheduler of outbound delivery: work that waits is data, served by a few workers.

`StepScheduler` holds record ids, not records and not a coroutine per message. A held id waits
in exactly one of:
- a send lane: one FIFO per Cast account (`queue_send`), served by at most ``workers`` send
  workers of that lane, which exist only while it has work: a busy account never holds up
  another (they share only ``delivery.concurrency`` and the per-IP pace, in `CastClient`). A
  paused lane (`pause_lane`, castghld.accounts) keeps its ids in order and is not served until
  `resume_lane`; the owner may take ids from its head (`take_head`: their deadline passed);
- a pool: one FIFO per pooled step (`Step.POLL`, `Step.REPORT`, `queue`), served by at most the
  pool's ``workers`` workers;
- the timer heap (`later`): a ``(due, seq, rid, step)`` tuple; one IOLoop timer moves due entries
  to their pool, or hands them to the owner (a send retry, a resume) to pick their queue;
- a running step.

Guarantees:
- Nothing is parked per message: 100k waiting messages are 100k ids in deques and heap tuples of
  atomic values (untracked by the GC) and a few dozen coroutines.
- A step kind is a plain str (`Step`), not an Enum: an Enum member (an IntEnum's too) is an
  object the GC tracks, and a tuple holding one stays tracked, for every full collection to walk.
- An id is held from `hold` until the owner `release`s it, or until its turn comes and the record
  is no longer live (finished, or dropped by the operator).
- Never lose a message to an unexpected error: a step that raises is logged and its id comes back
  after ``PIPELINE_RETRY[0]`` as `Step.RESUME`; the owner queues it for the step its record's
  stage calls for.
- `stop` cancels every worker where it is and forgets the queues: what matters is in the outbox
  journal, and the next start dispatches every unfinished record again.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from castghld.outbox import PIPELINE_RETRY

StepRun = Callable[[str], Awaitable[None]]


class Step:
    """What a queued id, or a timer entry once due, does. Plain str values (see the module
    docstring). SEND is served per lane; POLL and REPORT by pools; RESUME is never served: it
    only returns a record to the owner after a step raised."""

    SEND = "send"  # one Cast attempt (a due SEND entry is a send retry)
    POLL = "poll"  # one delivery-status lookup (a receipt)
    REPORT = "report"  # one status report to GHL
    RESUME = "resume"  # after an unexpected error: the step the record's stage calls for


class _Queue:
    """Ids ready for one step (one lane or one pool), FIFO, and how many workers serve them."""

    __slots__ = ("ready", "workers")

    def __init__(self) -> None:
        self.ready: collections.deque[str] = collections.deque()
        self.workers = 0


class StepScheduler:
    """Held ids, their queues, the timer heap and the workers (see the module docstring).

    `live(rid)` says whether the record still exists; `on_due(rid, step)` takes a due timer entry
    that no pool serves (`Step.SEND`: a send retry, `Step.RESUME`) and queues it; `log` is the
    owner's logger, for the line of a step that raised.
    """

    def __init__(
        self,
        live: Callable[[str], bool],
        on_due: Callable[[str, str], None],
        log: logging.Logger,
    ):
        self.stopping = False
        self._live = live
        self._on_due = on_due
        self._log = log
        self._held: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._runs: dict[str, StepRun] = {}
        self._limits: dict[str, int] = {}
        self._lanes: dict[str, _Queue] = {}
        self._paused_lanes: set[str] = set()
        self._pools: dict[str, _Queue] = {}
        self._timers: list[tuple[float, int, str, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task] = set()

    def serve(self, step: str, run: StepRun, workers: int) -> None:
        """Run `run(rid)` for each id queued for `step`, by at most `workers` workers at a time:
        per lane for `Step.SEND`, in one pool for any other step."""
        self._runs[step] = run
        self._limits[step] = workers
        if step != Step.SEND:
            self._pools[step] = _Queue()

    # -- held ids ------------------------------------------------------------------------------

    def hold(self, rid: str) -> bool:
        """Take `rid`; False if it is held already or the scheduler is stopping."""
        if self.stopping or rid in self._held:
            return False
        self._held.add(rid)
        self._idle.clear()
        return True

    def release(self, rid: str) -> None:
        self._held.discard(rid)
        if not self._held:
            self._idle.set()

    def holds(self, rid: str) -> bool:
        return rid in self._held

    @property
    def active(self) -> int:
        return len(self._held)

    async def wait_idle(self) -> None:
        while self._held:
            await self._idle.wait()

    async def stop(self) -> None:
        """Stop the workers where they are; the records stay in the outbox for the next start."""
        self.stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._held.clear()
        self._lanes.clear()
        self._paused_lanes.clear()
        self._timers.clear()
        for pool in self._pools.values():
            pool.ready.clear()
        self._idle.set()

    # -- queues --------------------------------------------------------------------------------

    def queue_send(self, rid: str, lane_name: str, front: bool = False) -> None:
        """Queue `rid` for `Step.SEND` in its lane (a Cast account); `front` for a send retry:
        it has waited longest."""
        lane = self._lanes.get(lane_name)
        if lane is None:
            lane = self._lanes[lane_name] = _Queue()
        if front:
            lane.ready.appendleft(rid)
        else:
            lane.ready.append(rid)
        self._serve_lane(lane_name, lane)

    def _serve_lane(self, lane_name: str, lane: _Queue) -> None:
        limit = self._limits[Step.SEND]
        if lane_name in self._paused_lanes:
            return
        while not self.stopping and lane.workers < min(len(lane.ready), limit):
            lane.workers += 1
            self.spawn(self._send_worker(lane_name, lane))

    def pause_lane(self, lane_name: str) -> None:
        """Serve no more of the lane's ids (workers finish the send they are in)."""
        self._paused_lanes.add(lane_name)

    def resume_lane(self, lane_name: str) -> None:
        self._paused_lanes.discard(lane_name)
        lane = self._lanes.get(lane_name)
        if lane is not None:
            self._serve_lane(lane_name, lane)

    def lane_ids(self, lane_name: str) -> Iterator[str]:
        """The ids waiting in the lane, head first (no await while iterating)."""
        lane = self._lanes.get(lane_name)
        return iter(lane.ready) if lane is not None else iter(())

    def take_head(self, lane_name: str, count: int) -> list[str]:
        """Take the first `count` ids out of the lane (they stay held: the owner goes on with
        them)."""
        lane = self._lanes.get(lane_name)
        if lane is None:
            return []
        return [lane.ready.popleft() for _ in range(min(count, len(lane.ready)))]

    def queue(self, step: str, rid: str) -> None:
        """Queue `rid` for a pooled step (`Step.POLL`, `Step.REPORT`)."""
        pool = self._pools[step]
        pool.ready.append(rid)
        limit = self._limits[step]
        while not self.stopping and pool.workers < min(len(pool.ready), limit):
            pool.workers += 1
            self.spawn(self._pool_worker(pool, self._runs[step]))

    def later(self, delay: float, rid: str, step: str) -> None:
        """Queue `rid` for `step` in `delay` seconds: a retry's backoff, a poll's due time."""
        due = time.monotonic() + max(0.0, delay)
        heapq.heappush(self._timers, (due, next(self._seq), rid, step))
        if self._timer is None or due < self._timer_due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_due = due
            self._timer = asyncio.get_running_loop().call_at(due, self._fire)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run `coroutine` as a task that `stop` cancels."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- workers and the timer -----------------------------------------------------------------

    def _alive(self, rid: str) -> bool:
        if self._live(rid):
            return True
        self.release(rid)  # finished or dropped meanwhile (castghld outbox drop)
        return False

    async def _send_worker(self, name: str, lane: _Queue) -> None:
        run = self._runs[Step.SEND]
        try:
            while lane.ready and not self.stopping and name not in self._paused_lanes:
                await self._guarded(run, lane.ready.popleft())
        finally:
            lane.workers -= 1
            if not lane.ready and not lane.workers and self._lanes.get(name) is lane:
                del self._lanes[name]

    async def _pool_worker(self, pool: _Queue, run: StepRun) -> None:
        try:
            while pool.ready and not self.stopping:
                await self._guarded(run, pool.ready.popleft())
        finally:
            pool.workers -= 1

    async def _guarded(self, run: StepRun, rid: str) -> None:
        if not self._alive(rid):
            return
        try:
            await run(rid)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never lose the message to an unexpected error: it stays in the outbox and goes
            # on from its stage after a pause (or at the next start).
            self._log.exception(
                "outbound: step failed for %s; retrying in %.0fs", rid, PIPELINE_RETRY[0]
            )
            self.later(PIPELINE_RETRY[0], rid, Step.RESUME)

    def _fire(self) -> None:
        self._timer = None
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now and not self.stopping:
            _, _, rid, step = heapq.heappop(self._timers)
            if not self._alive(rid):
                continue
            if step in self._pools:
                self.queue(step, rid)
            else:
                self._on_due(rid, step)
        if self._timers and not self.stopping:
            self._timer_due = self._timers[0][0]
            self._timer = asyncio.get_running_loop().call_at(self._timer_due, self._fire)
