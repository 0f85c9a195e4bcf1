"""Fill / drain / calibrate-flow runs as tasks on the service's loop, pollable by id.

A synchronous request runs its routine through here too, so that one zone never runs two routines
at once (409) and `stop()` waits for what is still running (the service first tells the routines
to end, and each stops its pump on the way out; a run still going after the grace time is cancelled). Finished runs stay pollable for BRIDGE_TASK_KEEP_SEC.
A routine reads its task id from `current_task_id` (its durable row carries the same id); routines
a restarted bridge finds interrupted are added back as finished tasks (`add_finished`).
"""
from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from common.command_catalogue import CommandError
from common.commands import CommandPublishError
from common.lifecycle import drain_then_cancel

import metrics
from publisher import ApiError

log = logging.getLogger("bridge.tasks")

current_task_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_task_id", default=None)


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z") if moment else None


@dataclass
class RoutineTask:
    id: str
    kind: str
    zone_id: int
    created_at: dt.datetime
    state: str = "running"  # running | succeeded | failed | cancelled | interrupted
    finished_at: dt.datetime | None = None
    finished_mono: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    exception: Exception | None = field(default=None, repr=False)
    task: asyncio.Task | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"task_id": self.id, "kind": self.kind, "zone_id": self.zone_id, "state": self.state,
                "created_at": _iso(self.created_at), "finished_at": _iso(self.finished_at),
                "result": self.result, "error": self.error}


class TaskRegistry:
    def __init__(self, keep_sec: int, max_tasks: int):
        self.keep_sec = keep_sec
        self.max_tasks = max_tasks
        self._tasks: dict[str, RoutineTask] = {}

    def start(self, kind: str, zone_id: int, run: Callable[[], Awaitable[dict[str, Any]]]) -> RoutineTask:
        self._forget_old()
        for other in self._tasks.values():
            if other.zone_id == zone_id and other.state == "running":
                raise ApiError(409, f"zone {zone_id} is already running a {other.kind} routine "
                                    f"(task {other.id})")
        if len(self._tasks) >= self.max_tasks:
            raise ApiError(429, f"too many routines: at most {self.max_tasks} are kept", {"Retry-After": "60"})
        entry = RoutineTask(uuid.uuid4().hex, kind, zone_id, dt.datetime.now(dt.timezone.utc))
        entry.task = asyncio.create_task(self._run(entry, run), name=f"routine-{kind}-{zone_id}")
        self._tasks[entry.id] = entry
        return entry

    def add_finished(self, task_id: str, kind: str, zone_id: int, created_at: dt.datetime, state: str,
                     result: dict[str, Any]) -> RoutineTask:
        """A routine that ended elsewhere (interrupted by a bridge that died), pollable like the others."""
        self._forget_old()
        entry = RoutineTask(task_id, kind, zone_id, created_at.replace(tzinfo=dt.timezone.utc), state=state,
                            finished_at=dt.datetime.now(dt.timezone.utc), finished_mono=time.monotonic(),
                            result=result)
        self._tasks[task_id] = entry
        return entry

    def get(self, task_id: str) -> RoutineTask | None:
        self._forget_old()
        return self._tasks.get(task_id)

    async def wait(self, entry: RoutineTask) -> dict[str, Any]:
        """Wait for a run (synchronous request): its result, or the exception it ended with."""
        try:
            await asyncio.shield(entry.task)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the request itself is being cancelled
                raise
            raise ApiError(503, f"the {entry.kind} routine was cancelled: the bridge is stopping",
                           {"Retry-After": "5"}) from None
        if entry.exception is not None:
            raise entry.exception
        return entry.result

    async def _run(self, entry: RoutineTask, run: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        current_task_id.set(entry.id)
        metrics.ROUTINES_RUNNING.inc()
        try:
            entry.result = await run()
            if entry.result.get("success"):
                entry.state = "succeeded"
            else:
                entry.state = "cancelled" if entry.result.get("error") == "cancelled" else "failed"
        except asyncio.CancelledError:
            entry.state = "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001 - kept for the poller and for a waiting request
            status = exc.status if isinstance(exc, ApiError) else _status_of(exc)
            entry.state, entry.exception = "failed", exc
            entry.error = {"status": status, "detail": exc.detail if isinstance(exc, ApiError) else str(exc)}
            if status == 500:
                log.error("routine_failed", exc_info=exc, extra={"task_id": entry.id, "kind": entry.kind,
                                                                 "zone_id": entry.zone_id})
        finally:
            metrics.ROUTINES_RUNNING.dec()
            metrics.ROUTINES.labels(entry.kind, entry.state).inc()
            entry.finished_at = dt.datetime.now(dt.timezone.utc)
            entry.finished_mono = time.monotonic()

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - self.keep_sec
        for task_id in [t.id for t in self._tasks.values() if t.finished_mono is not None and t.finished_mono < cutoff]:
            del self._tasks[task_id]

    async def stop(self, grace_sec: float = 15.0) -> None:
        """Wait for runs to finish (the caller has told them to end), cancel what is left after grace_sec."""
        await drain_then_cancel([t.task for t in self._tasks.values() if t.task is not None and not t.task.done()],
                                grace_sec)


def _status_of(exc: Exception) -> int:
    if isinstance(exc, CommandError):
        return 422
    if isinstance(exc, CommandPublishError):
        return 503
    return 500
