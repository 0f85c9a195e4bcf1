"""Command line: `python -m tools.node_sim [options]` from the repository root.

Broker and database come from the usual environment variables (MQTT_HOST, MQTT_PORT, MQTT_USER,
MQTT_PASS, MQTT_TLS, MQTT_CA_FILE, MQTT_TOPIC_ROOT, PG_*); options override them. Prints one
status line every --status-every seconds; stops cleanly on Ctrl-C / SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time

from common.env import settings_or_exit
from common.logs import setup_logging

from .faults import SensorFault
from .fleet import Simulator
from .layout import NODE_TYPES, layout_from_db, synthetic_layout
from .options import SimOptions
from .reservoir import ReservoirParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.node_sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("broker")
    g.add_argument("--host", help="MQTT host (default: $MQTT_HOST, else 127.0.0.1)")
    g.add_argument("--port", type=int, help="MQTT port (default: $MQTT_PORT)")
    g.add_argument("--topic-root", help="first topic segment (default: $MQTT_TOPIC_ROOT, hydro)")
    g.add_argument("--client-prefix",
                   help="client id prefix, the hardware id is appended (default: $MQTT_CLIENT_ID-sim-, so two "
                        "simulators with different MQTT_CLIENT_ID never take over each other's sessions)")
    g = p.add_argument_group("layout")
    g.add_argument("--from-db", action="store_true",
                   help="simulate exactly the nodes and channels in PostgreSQL (PG_* variables)")
    g.add_argument("--greenhouses", type=int, default=1)
    g.add_argument("--zones", type=int, default=2, help="zones per greenhouse (zone ids 1, 2, … in order)")
    g.add_argument("--nodes", type=int, default=5, help="nodes per zone; types in turn: " + ", ".join(NODE_TYPES))
    g.add_argument("--unregistered", type=int, default=0, help="extra nodes on temporary ids that send node_hello (also with --from-db)")
    g.add_argument("--hello-greenhouse", default="", help="greenhouse_token sent in node_hello")
    g = p.add_argument_group("rates")
    g.add_argument("--poll-ms", type=int, default=0, help="every sensor's poll interval (default: its channel's)")
    g.add_argument("--heartbeat-sec", type=float, default=15.0)
    g.add_argument("--ph-drift", type=float, default=ReservoirParams.ph_drift_per_min, help="pH rise per minute")
    g.add_argument("--initial-ph", type=float, default=6.3)
    g.add_argument("--initial-ec", type=float, default=1.1)
    g = p.add_argument_group("faults")
    g.add_argument("--drop-responses", type=float, default=0.0, metavar="P", help="leave a command unanswered with probability P")
    g.add_argument("--malformed", type=float, default=0.0, metavar="P", help="send a garbage payload with probability P")
    g.add_argument("--offline-every", type=float, default=0.0, metavar="SEC", help="drop a random node's connection this often")
    g.add_argument("--offline-for", type=float, default=20.0, metavar="SEC", help="... and bring it back after this long")
    g.add_argument("--sensor-fault", action="append", default=[], metavar="NODE/CHANNEL=MODE",
                   help="a broken probe (repeatable): stuck[:VALUE][@AFTER_SEC] (frozen, at VALUE or at the reading "
                        "when it freezes) or spikes:OFFSET[/EVERY] (two readings in a row off by OFFSET every EVERY)")
    p.add_argument("--for", dest="run_for", type=float, default=0.0, metavar="SEC", help="stop after SEC seconds")
    p.add_argument("--status-every", type=float, default=10.0, metavar="SEC", help="print a status line (0: never)")
    p.add_argument("--alive-file", metavar="PATH",
                   help="rewrite PATH every second with 'online N' (a container health check reads it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_or_exit()
    setup_logging("node-sim", settings.log_level)
    if args.from_db:
        layout = asyncio.run(layout_from_db(settings))
        known = {n.hardware_id for n in layout}
        layout += [n for n in synthetic_layout(0, 0, 0, unregistered=args.unregistered) if n.hardware_id not in known]
    else:
        layout = synthetic_layout(args.greenhouses, args.zones, args.nodes, unregistered=args.unregistered)
    if not layout:
        print("node-sim: no nodes to simulate", file=sys.stderr)
        return 1
    options = SimOptions(
        host=args.host or (settings.mqtt_host if "MQTT_HOST" in os.environ else "127.0.0.1"),
        port=args.port or settings.mqtt_port,
        username=settings.mqtt_user, password=settings.mqtt_pass, tls=settings.mqtt_tls,
        ca_file=settings.mqtt_ca_file, topic_root=args.topic_root or settings.mqtt_topic_root,
        client_prefix=args.client_prefix or f"{settings.mqtt_client_id}-sim-", poll_ms=args.poll_ms, heartbeat_sec=args.heartbeat_sec,
        hello_greenhouse=args.hello_greenhouse, drop_rate=args.drop_responses, malformed_rate=args.malformed,
        offline_every_sec=args.offline_every, offline_for_sec=args.offline_for,
        initial_ph=args.initial_ph, initial_ec=args.initial_ec,
        reservoir=ReservoirParams(ph_drift_per_min=args.ph_drift))
    sim = Simulator(options, layout)
    try:
        for text in args.sensor_fault:
            node, channel, fault = SensorFault.parse(text)
            sim.node(node).sensor_faults[channel] = fault
    except (ValueError, KeyError) as exc:
        print(f"node-sim: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sim.start(wait=None)
    zones = sorted({n.spec.zone_id for n in sim.nodes.values() if n.spec.registered})
    print(f"node-sim: {len(sim.nodes)} nodes, zones {zones}, broker {options.host}:{options.port}, "
          f"root {options.topic_root}", flush=True)
    deadline = time.monotonic() + args.run_for if args.run_for > 0 else None
    next_status = time.monotonic() + args.status_every
    next_alive = 0.0
    try:
        while not stop.wait(0.5):
            now = time.monotonic()
            if args.alive_file and now >= next_alive:
                next_alive = now + 1.0
                online = sum(1 for n in sim.nodes.values() if n.connected.is_set())
                with open(args.alive_file, "w") as handle:
                    handle.write(f"online {online}\n")
            if deadline and now >= deadline:
                break
            if args.status_every > 0 and now >= next_status:
                next_status = now + args.status_every
                print(status_line(sim), flush=True)
    finally:
        sim.stop()
    print("node-sim: stopped " + status_line(sim), flush=True)
    return 0


def status_line(sim: Simulator) -> str:
    s = sim.stats
    online = sum(1 for n in sim.nodes.values() if n.connected.is_set())
    zones = " ".join(f"z{k}:pH={r.snapshot()['ph']:.2f},EC={r.snapshot()['ec']:.2f}"
                     for k, r in sorted(sim.reservoirs().items(), key=lambda kv: str(kv[0])) if isinstance(k, int))
    return (f"online {online}/{len(sim.nodes)} telemetry {s.get('telemetry_sent', 0)} "
            f"commands {s.get('commands_received', 0)} ack {s.get('response_ack', 0)} "
            f"error {s.get('response_error', 0)} configs {s.get('configs_applied', 0)} {zones}")


if __name__ == "__main__":
    sys.exit(main())
