"""Executing firings by stage: each stage is done for every firing of a tick at once.

1. read: the online channels of every zone concerned (one query) and the irrigated zones' water level;
2. plan each firing (no I/O): the records that must exist before its commands go out (run links,
   valve closes, the fallback finish), its commands, or an outcome without any (no nodes, ...);
3. write every firing's "before" records in one transaction;
4. send: every command through common.commands, zones side by side (SCHEDULER_CONCURRENCY at once,
   one zone's commands in order), so issue_command's group commit batches them;
5. write every firing's records of what was sent (events, finishes, logs) in one transaction.

A stage that fails for the batch is redone firing by firing, so one firing's bad record never fails
the others (the failing one is marked `failed`, as any firing that raises).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Callable

from actuators import Order, Sent, freshest_metrics, zones_channels
from context import JobContext
from runs import Firing, Writes, naive_utc


@dataclass(slots=True)
class Facts:
    """What the firings of a stage read from the database, per zone."""
    channels: dict[int, list[Any]] = field(default_factory=dict)   # online node channels
    water_levels: dict[int, float] = field(default_factory=dict)   # fresh WATER_LEVEL of irrigated zones


@dataclass(slots=True)
class Plan:
    """One firing (or follow-up) worked out: records, commands, and what to record once they went out."""
    zone_id: int
    gh_uid: str
    run_id: int
    before: Writes
    orders: list[Order] = field(default_factory=list)
    after: Callable[[list[Sent], Writes], str] | None = None   # records the sends; returns the outcome
    outcome: str | None = None   # known without sending anything
    later: Writes | None = None   # what `after` recorded
    sent: list[Sent] = field(default_factory=list)
    error: BaseException | None = None


Planner = Callable[[JobContext, Firing, Facts, dt.datetime], Plan]   # a kind's plan(ctx, firing, facts, now)


async def read_facts(ctx: JobContext, firings: list[Firing], now: dt.datetime) -> Facts:
    zone_ids = sorted({f.zone.zone_id for f in firings})
    irrigated = sorted({f.zone.zone_id for f in firings if f.kind == "irrigation"})
    facts = Facts(await zones_channels(ctx.db, zone_ids))
    if irrigated:
        fresh_after = naive_utc(now) - dt.timedelta(minutes=ctx.settings.telemetry_max_age_min)
        facts.water_levels = await freshest_metrics(ctx.db, irrigated, "WATER_LEVEL", fresh_after)
    return facts


async def send(ctx: JobContext, plan: Plan) -> None:
    for order in plan.orders:
        plan.sent.append(await ctx.sender.issue(plan.run_id, plan.gh_uid, plan.zone_id, order))


def record_sent(plan: Plan, now: dt.datetime) -> None:
    plan.later = Writes(now)
    plan.outcome = plan.after(plan.sent, plan.later)


async def run_one(ctx: JobContext, plan: Plan, now: dt.datetime) -> str:
    """Every stage for one plan (a follow-up, or a firing executed on its own)."""
    await plan.before.flush(ctx.db)
    if plan.outcome is not None:
        return plan.outcome
    await send(ctx, plan)
    record_sent(plan, now)
    await plan.later.flush(ctx.db)
    return plan.outcome


async def fire_one(ctx: JobContext, planner: Planner, firing: Firing, now: dt.datetime) -> str:
    facts = await read_facts(ctx, [firing], now)
    return await run_one(ctx, planner(ctx, firing, facts, now), now)
