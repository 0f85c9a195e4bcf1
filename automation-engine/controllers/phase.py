"""Phase transition (contract §8.2): forward-only by elapsed time; open-ended phases never end.
Sets the context's targets from the (possibly new) current phase; the engine sets them from the
current phase beforehand, for zones that run without this controller (NULL capabilities)."""
from __future__ import annotations

from actions import ZoneContext
from common.alerts import add_zone_event
from targets import due_phase_index


def current_targets(ctx: ZoneContext) -> dict:
    phase = next((p for p in ctx.zone.phases if p.index == ctx.zone.current_phase_index), None)
    return dict(phase.targets) if phase else {}


async def run(ctx: ZoneContext) -> None:
    zone = ctx.zone
    due = due_phase_index(zone.phases, zone.started_at, ctx.now)
    if due is not None and due > zone.current_phase_index:
        async with ctx.db.transaction() as conn:
            moved = await conn.fetchval(
                "UPDATE zone_recipe_instances SET current_phase_index = $2, updated_at = now()"
                " WHERE id = $1 AND current_phase_index < $2 RETURNING id", zone.instance_id, due)
            if moved is not None:
                await add_zone_event(conn, zone.id, "PHASE_TRANSITION",
                                     {"from_phase": zone.current_phase_index, "to_phase": due})
        if moved is not None:
            ctx.log.append("event:PHASE_TRANSITION")
            ctx.events_written.add("PHASE_TRANSITION")
        zone.current_phase_index = due
    ctx.targets = current_targets(ctx)
