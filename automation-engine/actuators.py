"""Relays and PWM outputs driven by state (climate, lighting): a command goes out only when the
commanded state changes, or to re-assert an unchanged state after ACTUATOR_REASSERT_MIN, or to
retry one the node failed / never answered (after a minute). The last commanded state is read
from the cycle's `commands` rows, so it survives restarts and is shared by replicas."""
from __future__ import annotations

import datetime as dt
from typing import Any

import metrics as m
from actions import ZoneContext
from common.command_catalogue import CommandError
from common.commands import CommandPublishError
from snapshot import CommandRow, Node

RETRY_FAILED_AFTER = dt.timedelta(minutes=1)


def last_command(ctx: ZoneContext, node: Node, channel: str, kinds: tuple[str, ...]) -> CommandRow | None:
    found = [c for c in ctx.zone.commands if c.node_id == node.id and c.channel == channel and c.cmd in kinds]
    return found[-1] if found else None  # commands are ordered by creation


def commanded(ctx: ZoneContext, node: Node, channel: str, kinds: tuple[str, ...]) -> tuple[str, dict] | None:
    last = last_command(ctx, node, channel, kinds)
    return (last.cmd, dict(last.params)) if last else None


async def ensure(ctx: ZoneContext, controller: str, node: Node, channel: str, cmd: str, params: dict[str, Any],
                 *, kinds: tuple[str, ...], event: str | None = None, details: dict[str, Any] | None = None) -> bool:
    """Bring (node, channel) to `cmd params`; returns True when a change of state was published."""
    if not node.online:
        m.ACTUATIONS.labels(controller, "node_offline").inc()
        return False
    last = last_command(ctx, node, channel, kinds)
    if last is not None and last.cmd == cmd and last.params == params:
        age = ctx.now - last.created_at
        if last.status in ("failed", "timeout"):
            if age < RETRY_FAILED_AFTER:
                return False
        elif age < dt.timedelta(minutes=ctx.options.reassert_min):
            return False
        change = False
    else:
        change = True
    cmd_id = await send(ctx, controller, node, channel, cmd, params, outcome=cmd if change else "reassert")
    if cmd_id is None:
        return False
    if change and event:
        await ctx.event(event, {**(details or {}), "node_uid": node.uid, "channel": channel, "cmd": cmd,
                                "params": params, "cmd_id": cmd_id})
    return change


async def send(ctx: ZoneContext, controller: str, node: Node, channel: str, cmd: str, params: dict[str, Any],
               *, outcome: str | None = None) -> str | None:
    """Issue one command; the cmd_id, or None when it was refused or not published (counted)."""
    try:
        cmd_id = await ctx.command(node, channel, cmd, params, controller)
    except CommandError as exc:
        m.ACTUATIONS.labels(controller, "rejected").inc()
        ctx.log.append(f"rejected:{controller}:{exc}")
        return None
    except CommandPublishError:
        m.ACTUATIONS.labels(controller, "publish_failed").inc()
        ctx.log.append(f"publish_failed:{controller}")
        return None
    m.ACTUATIONS.labels(controller, outcome or cmd).inc()
    return cmd_id
