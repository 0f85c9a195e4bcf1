"""The Docker engine and the stand-in base images for `make compose-check`.

This machine reaches no image registry, so every image our compose files and Dockerfiles name
(python:3.11-slim, eclipse-mosquitto:2, the TimescaleDB, Redis and Prometheus images) is built here
from Debian packages under exactly that name: debootstrap makes a Debian root file system, `docker
import` turns it into the base image hydro-standin/debian:bookworm, and standins/<dir>/Dockerfile
adds the packages and the official image's entrypoint, paths and command. Each image carries a label
with the hash of its definition: built once, rebuilt only when its definition changes. An image of
the same name without that label (a real one, pulled on a machine with a registry) is used as it is.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STANDINS = HERE / "standins"
BASE_IMAGE = "hydro-standin/debian:bookworm"
SUITE = "bookworm"
LABEL = "hydro.standin.hash"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
DOCKERD_LOG = Path("/var/log/hydro-compose-check-dockerd.log")

# image name as our files spell it -> stand-in definition under standins/
STANDIN_IMAGES = {
    "python:3.11-slim": "python",
    "eclipse-mosquitto:2": "mosquitto",
    "timescale/timescaledb:2.17.2-pg16": "postgres",
    "redis:7-alpine": "redis",
    "prom/prometheus:v2.54.1": "prometheus",
}
# Named by our compose files, not in Debian: no stand-in, the check starts the stacks without it.
NO_STANDIN = {"grafana/grafana:10.4.8": "Grafana is not packaged by Debian"}

# debian package -> commands the check needs on the host
HOST_PACKAGES = {"docker.io": ("dockerd",), "docker-compose": ("docker-compose",), "debootstrap": ("debootstrap",)}


class EngineError(RuntimeError):
    pass


def run(cmd: list[str], *, input: bytes | None = None, check: bool = True, timeout: float | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise EngineError(f"{' '.join(cmd[:4])} … exited {proc.returncode}: "
                          f"{proc.stderr.decode(errors='replace').strip()[-800:]}")
    return proc


def docker_cli() -> str:
    """Debian's client matches Debian's engine; any other `docker` on PATH is a fallback."""
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")


def ensure_host_packages() -> list[str]:
    """apt-get install what is missing (as root); returns the packages installed."""
    missing = [pkg for pkg, cmds in HOST_PACKAGES.items() if not all(shutil.which(c) for c in cmds)]
    if not missing:
        return []
    if os.geteuid() != 0:
        raise EngineError(f"missing {', '.join(missing)}; run as root or `apt-get install {' '.join(missing)}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env, timeout=600)
    run(["apt-get", "install", "-y", "-q", *missing], env=env, timeout=1200)
    return missing


def engine_answers() -> bool:
    return subprocess.run([docker_cli(), "info"], capture_output=True, timeout=30).returncode == 0


def uplink_mtu() -> int | None:
    """MTU of the default route's interface: containers must not use larger packets than the uplink."""
    try:
        route = subprocess.run(["ip", "-o", "route", "show", "default"], capture_output=True, text=True).stdout
        dev = re.search(r"\bdev (\S+)", route).group(1)
        return int(Path(f"/sys/class/net/{dev}/mtu").read_text())
    except (AttributeError, OSError, ValueError):
        return None


def start_engine() -> str:
    """Start dockerd in the background (no systemd here), logging to DOCKERD_LOG; returns how."""
    if engine_answers():
        return "engine already running"
    if os.geteuid() != 0:
        raise EngineError("the Docker engine is not running and starting it needs root")
    args = ["dockerd"]
    mtu = uplink_mtu()
    if mtu and mtu < 1500:
        args += ["--mtu", str(mtu)]
    for attempt in ("default", "iptables-legacy"):
        if attempt == "iptables-legacy":
            # Kernels without nf_tables support: the legacy back end of iptables.
            if not shutil.which("iptables-legacy") or "iptables" not in DOCKERD_LOG.read_text(errors="replace"):
                break
            run(["update-alternatives", "--set", "iptables", "/usr/sbin/iptables-legacy"], check=False)
            run(["update-alternatives", "--set", "ip6tables", "/usr/sbin/ip6tables-legacy"], check=False)
        with open(DOCKERD_LOG, "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if engine_answers():
                return f"started {' '.join(args)} (pid {proc.pid}, log {DOCKERD_LOG}, iptables {attempt})"
            time.sleep(1)
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    tail = DOCKERD_LOG.read_text(errors="replace").splitlines()[-15:]
    raise EngineError("dockerd did not start:\n  " + "\n  ".join(tail))


def image_label(image: str) -> str | None:
    """The stand-in hash label of a local image; '' for an image without it, None when absent."""
    proc = subprocess.run([docker_cli(), "image", "inspect", "-f", "{{json .Config.Labels}}", image],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    match = re.search(rf'"{re.escape(LABEL)}":"([0-9a-f]+)"', proc.stdout)
    return match.group(1) if match else ""


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    sources = sorted(Path("/etc/apt").glob("sources.list.d/*.sources")) + [Path("/etc/apt/sources.list")]
    sources += sorted(Path("/etc/apt").glob("sources.list.d/*.list"))
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for url in re.findall(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            if re.search(r"/debian/?$", url):
                return url
    return "http://deb.debian.org/debian"


def ensure_base() -> str:
    if image_label(BASE_IMAGE) is not None:
        return f"{BASE_IMAGE} present"
    mirror = apt_mirror()
    with tempfile.TemporaryDirectory(prefix="hydro-standin-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", SUITE, str(root), mirror], timeout=1800)
        # Package scripts must not try to start daemons while an image is built.
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [docker_cli(), "import",
             "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--change", 'CMD ["bash"]', "-", BASE_IMAGE],
            stdin=tar.stdout, capture_output=True)
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise EngineError(f"docker import failed: {imported.stderr.decode(errors='replace')[-500:]}")
    return f"{BASE_IMAGE} built by debootstrap from {mirror}"


def definition_hash(directory: Path, extra: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()) + extra:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_standin(image: str, name: str, log_dir: Path) -> str:
    directory = STANDINS / name
    extra = [HOST_CA] if name == "python" else []
    wanted = definition_hash(directory, extra)
    have = image_label(image)
    if have == "":
        return "a real image is present, used as it is"
    if have == wanted:
        return "stand-in present"
    with tempfile.TemporaryDirectory(prefix="hydro-standin-ctx-") as ctx:
        shutil.copytree(directory, ctx, dirs_exist_ok=True)
        if name == "python":
            shutil.copy(HOST_CA, Path(ctx) / "host-ca-certificates.crt")
        log = log_dir / f"standin-{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.run([docker_cli(), "build", "--label", f"{LABEL}={wanted}", "-t", image, ctx],
                                  stdout=out, stderr=subprocess.STDOUT, timeout=1800)
        if proc.returncode != 0:
            raise EngineError(f"building the stand-in {image} failed, see {log}")
    return f"stand-in built ({'rebuilt, definition changed' if have else 'new'})"
