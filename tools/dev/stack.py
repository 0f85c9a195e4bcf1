"""`make dev`: the whole stack on this machine, without Docker.

    python tools/dev/stack.py [--for SECONDS] [--check] [--no-sim] [--no-seed] [--seed-only]

1. PostgreSQL / Redis / Mosquitto on 127.0.0.1: reused when they answer, else started (or
   installed with apt as root) by tools/dev/ensure_services.sh.
2. Database PG_DB (default hydro_dev) created when missing, migrated (`python -m common.migrate`).
3. A demo greenhouse seeded (idempotent): one greenhouse, two zones on a lettuce recipe with pH / EC
   targets and irrigation / lighting schedules, five nodes per zone with their channels.
4. The five services started as processes (`python main.py` in their folders, PYTHONPATH = the
   repository root), each in its own process group; then the node simulator for the seeded nodes.
5. Where everything is, then one live status line read from PostgreSQL.
6. Ctrl-C / SIGTERM (or --for elapsed): SIGTERM to every process group started, SIGKILL after a
   grace period; nothing of ours keeps running.

Environment: the variables of README.md are honoured (PG_*, MQTT_*, REDIS_*, ports, intervals);
unset ones get dev values (local servers, user postgres, short automation intervals).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import orjson  # noqa: E402

from common.env import Settings, SettingsError  # noqa: E402
from tools.node_sim.layout import default_channels, hardware_id_for  # noqa: E402

PYTHON = os.environ.get("PYTHON") or sys.executable

# Dev values for what the caller's environment does not set.
DEV_ENV = {
    "APP_ENV": "local",
    "LOG_LEVEL": "info",
    "HTTP_HOST": "127.0.0.1",
    "MQTT_HOST": "127.0.0.1",
    "MQTT_PORT": "1883",
    "MQTT_CLIENT_ID": "hydro-dev",
    "MQTT_TOPIC_ROOT": "hydro",
    "PG_HOST": "127.0.0.1",
    "PG_PORT": "5432",
    "PG_DB": "hydro_dev",
    "PG_USER": "postgres",
    "PG_PASS": "",
    "REDIS_HOST": "127.0.0.1",
    "REDIS_PORT": "6379",
    "REDIS_KEY_PREFIX": "hydro:dev:",
    "PY_API_TOKEN": "dev-token",
    "LARAVEL_API_URL": "http://127.0.0.1:9",  # no Laravel here: services fall back to the database
    "COMMAND_TIMEOUT_SEC": "30",
    # short intervals so that a new user sees corrections within a minute
    "AUTOMATION_INTERVAL_SEC": "5",
    "SCHEDULER_INTERVAL_SEC": "10",
    "PH_COOLDOWN_MIN": "1",
    "EC_COOLDOWN_MIN": "1",
    "PH_AFTER_NUTRIENT_MIN": "0.5",
    "MAX_DOSES_PER_PUMP_HOUR": "60",
    "NODE_OFFLINE_SWEEP_SEC": "15",
}
PASSTHROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER")


@dataclass
class ServiceDef:
    folder: str
    ports: dict[str, str]  # label -> Settings field holding the port
    links: list[str] = field(default_factory=list)  # paths on the api port, printed as URLs (each answers GET 200)
    docs: bool = False  # serves /docs and /redoc (public pages; API calls with the token via Authorize)
    note: str = ""


OPS = ["/health", "/ready", "/metrics"]
SERVICES = [
    ServiceDef("mqtt-bridge", {"api": "bridge_port"}, OPS, docs=True),
    ServiceDef("history-logger", {"api": "history_logger_port", "metrics": "history_logger_metrics_port"},
               ["/health", "/ready"], note="POST /ingest/telemetry"),
    ServiceDef("automation-engine", {"api": "automation_port"}, OPS),
    ServiceDef("scheduler", {"api": "scheduler_port"}, OPS),
    ServiceDef("device-registry", {"api": "registry_port"}, OPS, docs=True),
]


def out(line: str = "") -> None:
    """Print for the user; a closed stdout (the reader went away) must never stop the clean-up."""
    try:
        print(line, flush=True)
    except (BrokenPipeError, OSError):
        pass


# ---------------------------------------------------------------------------------------
# Environment and servers
# ---------------------------------------------------------------------------------------
def build_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSTHROUGH if k in os.environ}
    for key, value in DEV_ENV.items():
        env[key] = os.environ.get(key, value)
    # every other setting the user exported (ports, telemetry knobs, service variables) goes through
    for key, value in os.environ.items():
        if key.isupper() and key not in env and not key.startswith(("MAKE", "MFLAGS", "_")):
            env[key] = value
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ensure_servers(settings: Settings) -> None:
    local = {settings.pg_host, settings.redis_host, settings.mqtt_host} <= {"127.0.0.1", "localhost"}
    ports = (settings.pg_port, settings.redis_port, settings.mqtt_port)
    if all(port_open(settings.pg_host if p == settings.pg_port else
                     settings.redis_host if p == settings.redis_port else settings.mqtt_host, p) for p in ports):
        out(f"servers: reusing PostgreSQL :{settings.pg_port}, Redis :{settings.redis_port}, "
            f"Mosquitto :{settings.mqtt_port}")
        return
    if not local or ports != (5432, 6379, 1883):
        raise SystemExit("stack: PostgreSQL / Redis / Mosquitto are not answering where PG_*/REDIS_*/MQTT_* point")
    out("servers: starting the missing ones (tools/dev/ensure_services.sh)")
    if subprocess.call(["bash", str(ROOT / "tools/dev/ensure_services.sh")]) != 0:
        raise SystemExit("stack: could not start PostgreSQL / Redis / Mosquitto (see above)")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    import socket
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


async def ensure_database(settings: Settings) -> bool:
    """Create settings.pg_db when missing; True when it was created now."""
    conn = await asyncpg.connect(host=settings.pg_host, port=settings.pg_port, user=settings.pg_user,
                                 password=settings.pg_pass or None, database="postgres")
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", settings.pg_db):
            return False
        await conn.execute(f'CREATE DATABASE "{settings.pg_db}"')
        return True
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------
# Demo data
# ---------------------------------------------------------------------------------------
DEMO_GH = "gh-demo"
DEMO_RECIPE = "Lettuce NFT (demo)"
ZONES = ("Zone A", "Zone B")
NODE_TYPES = ("ph", "ec", "climate", "irrig", "light")
UNITS = {"PH": "pH", "EC": "mS/cm", "TEMP_AIR": "°C", "TEMP_WATER": "°C", "HUMIDITY": "%", "CO2": "ppm",
         "LUX": "lux", "WATER_LEVEL": "fraction", "FLOW_RATE": "L/min"}


def demo_targets(phase: str) -> dict:
    every_quarter = [f"{h:02d}:{m:02d}" for h in range(24) for m in (0, 15, 30, 45)]
    targets = {"ph": {"min": 5.7, "max": 5.9}, "ec": {"min": 1.3, "max": 1.5}, "temp_air": 23, "humidity_air": 65,
               "irrigation_duration_sec": 8, "irrigation_schedule": every_quarter,
               "lighting_schedule": "06:00-22:00", "light_intensity": 80}
    if phase == "vegetative":
        targets.update(ec={"min": 1.5, "max": 1.7}, irrigation_duration_sec=12)
    return targets


async def seed_demo(conn: asyncpg.Connection) -> list[int]:
    """The demo greenhouse (idempotent); returns its zone ids."""
    jsonb = lambda v: orjson.dumps(v).decode()  # noqa: E731 - plain connection, no codec
    async with conn.transaction():
        gh_id = await conn.fetchval(
            "INSERT INTO greenhouses (uid, name, timezone, type, description, created_at, updated_at) "
            "VALUES ($1, 'Demo greenhouse', 'UTC', 'GREENHOUSE', 'seeded by make dev', now(), now()) "
            "ON CONFLICT (uid) DO UPDATE SET updated_at = now() RETURNING id", DEMO_GH)
        recipe_id = await conn.fetchval("SELECT id FROM recipes WHERE name = $1", DEMO_RECIPE)
        if recipe_id is None:
            recipe_id = await conn.fetchval(
                "INSERT INTO recipes (name, description, created_at, updated_at) "
                "VALUES ($1, 'two phases: seedling 14 days, then vegetative', now(), now()) RETURNING id", DEMO_RECIPE)
            for index, (name, hours) in enumerate((("seedling", 14 * 24), ("vegetative", None))):
                await conn.execute(
                    "INSERT INTO recipe_phases (recipe_id, phase_index, name, duration_hours, targets, created_at, "
                    "updated_at) VALUES ($1, $2, $3, $4, $5::jsonb, now(), now())",
                    recipe_id, index, name, hours, jsonb(demo_targets(name)))
        capabilities = {"ph_control": True, "ec_control": True, "climate_control": True, "light_control": True,
                        "irrigation_control": True, "recirculation": False, "flow_sensor": True}
        zone_ids = []
        for z, zone_name in enumerate(ZONES):
            zone_id = await conn.fetchval("SELECT id FROM zones WHERE greenhouse_id = $1 AND name = $2",
                                          gh_id, zone_name)
            if zone_id is None:
                zone_id = await conn.fetchval(
                    "INSERT INTO zones (greenhouse_id, name, description, capabilities, status, created_at, "
                    "updated_at) VALUES ($1, $2, 'NFT lettuce (demo)', $3::jsonb, 'RUNNING', now(), now()) "
                    "RETURNING id", gh_id, zone_name, jsonb(capabilities))
            zone_ids.append(zone_id)
            if not await conn.fetchval("SELECT 1 FROM zone_recipe_instances WHERE zone_id = $1", zone_id):
                await conn.execute(
                    "INSERT INTO zone_recipe_instances (zone_id, recipe_id, current_phase_index, started_at, "
                    "created_at, updated_at) VALUES ($1, $2, 0, now(), now(), now())", zone_id, recipe_id)
            letter = "ab"[z]
            for node_type in NODE_TYPES:
                uid = f"nd-{node_type}-demo-{letter}"
                node_id = await conn.fetchval(
                    "INSERT INTO nodes (zone_id, uid, hardware_id, name, type, fw_version, status, lifecycle_state, "
                    "validated, first_seen_at, created_at, updated_at) "
                    "VALUES ($1, $2, $3, $4, $5, 'sim-1.0.0', 'offline', 'ACTIVE', true, now(), now(), now()) "
                    "ON CONFLICT (uid) DO UPDATE SET zone_id = EXCLUDED.zone_id, updated_at = now() RETURNING id",
                    zone_id, uid, hardware_id_for(uid), f"{node_type} {zone_name}", node_type)
                for ch in default_channels(node_type):
                    config = {"poll_interval_ms": ch.poll_interval_ms} if ch.type == "SENSOR" else {
                        "safe_limits": ch.safe_limits, **({"ml_per_second": ch.ml_per_second}
                                                          if ch.ml_per_second is not None else {})}
                    await conn.execute(
                        "INSERT INTO node_channels (node_id, channel, type, metric, unit, config, created_at, "
                        "updated_at) VALUES ($1, $2, $3, $4, $5, $6::jsonb, now(), now()) "
                        "ON CONFLICT (node_id, channel) DO NOTHING",
                        node_id, ch.name, ch.type.lower(), ch.metric, UNITS.get(ch.metric or ""), jsonb(config))
    return zone_ids


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------
@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    reported_exit: bool = False


try:  # resolved here, in the parent: the forked child only makes the call (no imports, no locks)
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: SIGTERM when the runner dies, even by SIGKILL (Linux), so nothing is orphaned."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM))


class Processes:
    """Children in process groups of their own: stopping one stops everything it started."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], cwd: Path, env: dict[str, str]) -> Child:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as handle:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def exited(self) -> list[Child]:
        found = []
        for child in self.children:
            if child.proc.poll() is not None and not child.reported_exit:
                child.reported_exit = True
                found.append(child)
        return found

    def stop_all(self, grace: float = 15.0) -> None:
        for child in reversed(self.children):  # the simulator first, then the services
            self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                out(f"stop: {child.name} did not exit within {grace:g}s, killing it")
        for child in self.children:  # whatever is left in a group (a stuck child or grandchild)
            self._signal(child, signal.SIGKILL)
            if child.proc.poll() is None:
                child.proc.wait(5)

    @staticmethod
    def _signal(child: Child, sig: int) -> None:
        try:
            os.killpg(child.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


# ---------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------
STATUS_SQL = """
SELECT (SELECT coalesce(max(id), 0) FROM telemetry_samples) AS last_sample,
       (SELECT count(*) FROM commands WHERE created_at >= $1 AND status <> 'pending') AS sent,
       (SELECT count(*) FROM commands WHERE created_at >= $1 AND status = 'ack') AS acked,
       (SELECT count(*) FROM commands WHERE created_at >= $1 AND status IN ('failed', 'timeout')) AS failed,
       (SELECT count(*) FROM commands WHERE created_at >= $1 AND source = 'automation'
                                        AND cmd IN ('dose', 'run_pump')
                                        AND channel IN ('pump_acid', 'pump_base', 'pump_nutrient')) AS corrections,
       (SELECT count(*) FROM nodes WHERE status = 'online') AS online
"""
ZONES_SQL = """
SELECT DISTINCT ON (t.zone_id, t.metric_type) t.zone_id, z.name, t.metric_type, t.value
FROM telemetry_last t JOIN zones z ON z.id = t.zone_id
WHERE t.metric_type IN ('PH', 'EC') AND z.id = ANY($1::bigint[])
ORDER BY t.zone_id, t.metric_type, t.updated_at DESC
"""


class Status:
    def __init__(self, conn: asyncpg.Connection, zone_ids: list[int], since: dt.datetime):
        self.conn = conn
        self.zone_ids = zone_ids
        self.since = since
        self.first_sample: int | None = None
        self.last: tuple[float, int] | None = None
        self.rows_total = 0
        self.row = None

    async def line(self) -> str:
        row = await self.conn.fetchrow(STATUS_SQL, self.since)
        self.row = row
        now = time.monotonic()
        if self.first_sample is None:
            self.first_sample = row["last_sample"]
        rate = 0.0
        if self.last is not None and now > self.last[0]:
            rate = (row["last_sample"] - self.last[1]) / (now - self.last[0])
        self.last = (now, row["last_sample"])
        self.rows_total = row["last_sample"] - self.first_sample
        zones = {}
        for z in await self.conn.fetch(ZONES_SQL, self.zone_ids):
            zones.setdefault(z["name"], {})[z["metric_type"]] = z["value"]
        zone_text = "  ".join(
            f"{name}: pH {_fmt(values.get('PH'))} EC {_fmt(values.get('EC'))}" for name, values in sorted(zones.items()))
        return (f"telemetry {rate:6.1f} rows/s | nodes online {row['online']:2d} | commands sent {row['sent']} "
                f"acked {row['acked']} failed {row['failed']} (corrections {row['corrections']}) | "
                f"{zone_text or 'no pH/EC yet'}")


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.2f}"


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/dev/stack.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--for", dest="run_for", type=float, default=0.0, metavar="SECONDS",
                   help="run this long, then stop everything (default: until Ctrl-C)")
    p.add_argument("--check", action="store_true",
                   help="stop as soon as telemetry rows arrived, every started service answered /ready 200, and an "
                        "automation correction and a command ACK were seen; exit 1 if --for ends first")
    p.add_argument("--no-sim", action="store_true", help="do not start the node simulator")
    p.add_argument("--no-seed", action="store_true", help="do not seed the demo greenhouse")
    p.add_argument("--seed-only", action="store_true",
                   help="create / migrate the database and seed the demo greenhouse, then exit (compose's seed step)")
    p.add_argument("--status-every", type=float, default=2.0, metavar="SECONDS")
    p.add_argument("--logs", type=Path, help="directory for the processes' logs (default: a new temp dir)")
    p.add_argument("--sim-args", default="", help="extra options for tools.node_sim, e.g. '--drop-responses 0.1'")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    env = build_env()
    try:
        settings = Settings.from_env(env)
    except SettingsError as exc:
        out(f"configuration error: {exc}")
        return 2
    if not args.seed_only:
        ensure_servers(settings)
    if await ensure_database(settings):
        out(f"database: created {settings.pg_db}")
    if subprocess.call([PYTHON, "-m", "common.migrate"], cwd=ROOT, env=env) != 0:
        out("database: migration failed (see above)")
        return 1
    out(f"database: {settings.pg_db} migrated")
    conn = await asyncpg.connect(host=settings.pg_host, port=settings.pg_port, user=settings.pg_user,
                                 password=settings.pg_pass or None, database=settings.pg_db,
                                 server_settings={"timezone": "UTC"})
    try:
        if args.no_seed:
            zone_ids = [r["id"] for r in await conn.fetch("SELECT id FROM zones ORDER BY id")]
        else:
            zone_ids = await seed_demo(conn)
            out(f"demo: greenhouse {DEMO_GH}, zones {', '.join(f'{n} (zn-{i})' for n, i in zip(ZONES, zone_ids))}, "
                f"{len(NODE_TYPES) * len(zone_ids)} nodes, recipe '{DEMO_RECIPE}'")
        if args.seed_only:
            return 0
        since = (await conn.fetchval("SELECT now()::timestamp(0)")) - dt.timedelta(seconds=1)
        log_dir = args.logs or Path(tempfile.mkdtemp(prefix="hydro-dev-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        procs = Processes(log_dir)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            started = start_services(procs, env)
            print_where(started, env, settings, log_dir)
            await wait_ready(started, settings, stop, timeout=45.0)
            if not args.no_sim and not stop.is_set():
                # after the services subscribed: they see the nodes' live ONLINE, not a stale retained one
                sim_argv = [PYTHON, "-m", "tools.node_sim", "--from-db", "--status-every", "30",
                            "--heartbeat-sec", "10", "--initial-ph", "6.4", "--initial-ec", "1.1",
                            *args.sim_args.split()]
                procs.start("node-sim", sim_argv, ROOT, env)
                out("node-sim: started (python -m tools.node_sim --from-db): 10 simulated ESP32 nodes")
            return await live_status(args, conn, zone_ids, since, procs, started, settings, stop)
        finally:
            out("")
            out("stopping: " + ", ".join(c.name for c in reversed(procs.children)))
            procs.stop_all()  # out() never raises, so this always runs
            left = [c.name for c in procs.children if c.proc.poll() is None]
            out("stopped: nothing left running" if not left else f"still running: {left}")
            out(f"logs: {log_dir}")
    finally:
        await conn.close()


def start_services(procs: Processes, env: dict[str, str]) -> list[ServiceDef]:
    started = []
    for svc in SERVICES:
        folder = ROOT / svc.folder
        if not (folder / "main.py").is_file():
            out(f"skip {svc.folder}: no {svc.folder}/main.py yet")
            continue
        procs.start(svc.folder, [PYTHON, "main.py"], folder, env)
        started.append(svc)
        out(f"{svc.folder}: started (python main.py)")
    return started


def url(settings: Settings, port_field: str, path: str = "") -> str:
    host = settings.http_host if settings.http_host not in ("0.0.0.0", "", "::") else "127.0.0.1"
    return f"http://{host}:{getattr(settings, port_field)}{path}"


def print_where(started: list[ServiceDef], env: dict[str, str], settings: Settings, log_dir: Path) -> None:
    out("")
    out("where everything is:")
    # every http:// URL printed here answers GET 200 as printed (tests/test_dev_stack.py opens each one)
    for svc in started:
        api = url(settings, svc.ports["api"])
        links = [f"{api}{path}" for path in svc.links]
        if "metrics" in svc.ports:
            links.append(url(settings, svc.ports["metrics"], "/metrics"))
        out(f"  {svc.folder:<18} " + "  ".join(links) + (f"  ({svc.note})" if svc.note else ""))
        if svc.docs:
            out(f"  {'':<18} REST docs {api}/docs  ReDoc {api}/redoc  (API calls: Authorize with the token below)")
    out(f"  {'MQTT':<18} mqtt://{settings.mqtt_host}:{settings.mqtt_port}  topics {settings.mqtt_topic_root}/#  "
        f"(mosquitto_sub -h {settings.mqtt_host} -t '{settings.mqtt_topic_root}/#' -v)")
    out(f"  {'PostgreSQL':<18} psql -h {settings.pg_host} -U {settings.pg_user} {settings.pg_db}")
    out(f"  {'API token':<18} Authorization: Bearer {env.get('PY_API_TOKEN')}  (bridge /bridge/* and registry routes)")
    out(f"  {'logs':<18} {log_dir}/<service>.log")
    out("")


async def wait_ready(started: list[ServiceDef], settings: Settings, stop: asyncio.Event,
                     timeout: float) -> dict[str, int | None]:
    deadline = time.monotonic() + timeout
    codes: dict[str, int | None] = {}
    while not stop.is_set():
        for svc in started:
            if codes.get(svc.folder) != 200:
                codes[svc.folder] = await asyncio.to_thread(http_status, url(settings, svc.ports["api"], "/ready"))
        if all(code == 200 for code in codes.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    if started:
        out("ready: " + "  ".join(f"{name} {code or 'no answer'}" for name, code in codes.items()))
    return codes


async def live_status(args, conn, zone_ids, since, procs: Processes, started, settings: Settings,
                      stop: asyncio.Event) -> int:
    status = Status(conn, zone_ids, since)
    tty = sys.stdout.isatty()
    deadline = time.monotonic() + args.run_for if args.run_for > 0 else None
    last_printed = 0.0
    if not tty:
        out("status (every 10 s; Ctrl-C stops everything):")
    else:
        out("status (Ctrl-C stops everything):")
    line = ""
    while not stop.is_set():
        for child in procs.exited():
            out(("\n" if tty else "") + f"{child.name} exited with code {child.proc.returncode} "
                f"(log: {child.log})")
        try:
            line = await status.line()
        except (asyncpg.PostgresError, OSError) as exc:
            line = f"status unavailable: {exc}"
        now = time.monotonic()
        if tty:  # one line, rewritten in place: cut to the terminal's width so it never wraps
            width = shutil.get_terminal_size((160, 24)).columns - 1
            sys.stdout.write("\r\033[K" + (line if len(line) <= width else line[:width - 1] + "…"))
            sys.stdout.flush()
        elif now - last_printed >= 10 or (deadline and now >= deadline):
            out(line)
            last_printed = now
        if deadline and now >= deadline:
            break
        if args.check and all((await evaluate(status, started, settings))[0].values()):
            if tty:
                out("")
            out(line)
            out("check: everything seen, stopping early")
            break
        try:
            await asyncio.wait_for(stop.wait(), args.status_every)
        except asyncio.TimeoutError:
            pass
    if tty:
        out("")
    if not args.check:
        return 0
    checks, ready = await evaluate(status, started, settings)
    row = status.row
    out(f"check: telemetry rows {status.rows_total}, ready {ready}, "
        f"corrections {row['corrections'] if row else 0}, acked {row['acked'] if row else 0}")
    for name, ok in checks.items():
        out(f"check: {'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


async def evaluate(status: Status, started: list[ServiceDef], settings: Settings) -> tuple[dict, dict]:
    """The `make dev` promises: rows, readiness, a correction, an ACK."""
    row = status.row
    ready = {svc.folder: await asyncio.to_thread(http_status, url(settings, svc.ports["api"], "/ready"))
             for svc in started}
    checks = {
        "telemetry rows written": status.rows_total > 0,
        "every started service /ready 200": bool(started) and all(code == 200 for code in ready.values()),
        "an automation correction (dose / run_pump on a dosing pump)": bool(row and row["corrections"]),
        "a command acknowledged by a node": bool(row and row["acked"]),
    }
    return checks, ready


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which(PYTHON) is None and not Path(PYTHON).exists():
        out(f"stack: python not found at {PYTHON}")
        return 2
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
