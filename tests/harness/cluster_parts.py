"""Real cluster parts on loopback for the cluster tests: a PostgreSQL server, an MLflow server
on it, and a Ray cluster of a head and a second node. Each part is started in its own process
group and stopped by signalling that group, so a test ends only what it started (never
`ray stop`, which ends every Ray process of the machine).

Ports are chosen free by the kernel; every part binds 127.0.0.1 (the second Ray node
127.0.0.2, so the driver, on 127.0.0.1, always attaches to the head, and the second node can
be killed under it).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env() -> dict[str, str]:
    """The environment of every part and of the driver: this checkout's code, Ray without token
    authentication (loopback only; see docs/cluster.md for a real cluster's tokens), and fast
    node-death detection (seconds, not Ray's half a minute)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(PYTHONPATH=ROOT, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1",
               RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
               RAY_health_check_failure_threshold="3", RAY_USAGE_STATS_ENABLED="0",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    return env


def stop_group(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM, wait_s: float = 20) -> None:
    if proc is None or proc.poll() is not None and not _group_alive(proc.pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and (proc.poll() is None or _group_alive(proc.pid)):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _wait(check, what: str, timeout_s: float, proc: Optional[subprocess.Popen] = None,
          log: Optional[str] = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.3)
    tail = ""
    if log and os.path.exists(log):
        with open(log, errors="replace") as fh:
            tail = fh.read()[-3000:]
    raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s\n{tail}")


# ------------------------------------------------------------------------------------------
# PostgreSQL.
# ------------------------------------------------------------------------------------------
def postgres_bin() -> Optional[str]:
    """The folder of initdb/postgres (Debian: /usr/lib/postgresql/<version>/bin), or None."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.isfile(os.path.join(folder, "postgres")):
            return folder
    found = shutil.which("postgres")
    return os.path.dirname(found) if found else None


class Postgres:
    """A throw-away PostgreSQL server on 127.0.0.1:`port`, trust authentication for the role
    `postgres`. As root it runs as the `postgres` user (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="libra-pg-")  # not under pytest's 0700 tmp dirs
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "postgres.log")
        self.user = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.proc: Optional[subprocess.Popen] = None
        subprocess.run([os.path.join(self.bin, "initdb"), "-D", self.data, "-A", "trust",
                        "-U", "postgres", "--no-sync", "-E", "UTF8"], check=True,
                       capture_output=True, user=self.user, cwd=self.dir, timeout=120)

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [os.path.join(self.bin, "postgres"), "-D", self.data, "-p", str(self.port),
                 "-h", "127.0.0.1", "-k", self.dir, "-c", "fsync=off", "-c", "max_connections=200"],
                stdout=log, stderr=subprocess.STDOUT, user=self.user, cwd=self.dir,
                start_new_session=True)
        _wait(self._ready, "PostgreSQL", 60, self.proc, self.log)

    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def query(self, database: str, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.url(database)) as conn:
            return conn.execute(sql).fetchall()

    def stop(self) -> None:
        stop_group(self.proc, signal.SIGINT)  # SIGINT: PostgreSQL's "fast" shutdown
        self.proc = None

    def restart(self, down_s: float = 2.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# MLflow server.
# ------------------------------------------------------------------------------------------
class MlflowServer:
    """`mlflow server` on 127.0.0.1:`port`, its backend store at `backend_uri`, artifacts
    under `artifacts` (served through the server, as on a cluster)."""

    def __init__(self, backend_uri: str, artifacts: str, log: str):
        self.port = free_port()
        self.backend_uri = backend_uri
        self.artifacts = artifacts
        self.log = log
        self.proc: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1", "--backend-store-uri", self.backend_uri,
                 "--artifacts-destination", self.artifacts],
                stdout=log, stderr=subprocess.STDOUT, env=base_env(), start_new_session=True)
        _wait(self._healthy, "the MLflow server", timeout_s, self.proc, self.log)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None


# ------------------------------------------------------------------------------------------
# Ray.
# ------------------------------------------------------------------------------------------
class RayCluster:
    """A head (`ray start --head --block`, 127.0.0.1) and extra nodes (`ray start --address`),
    `cpus` CPUs each, every one in its own process group."""

    def __init__(self, log_dir: str):
        self.port = free_port()
        self.log_dir = log_dir
        self.head: Optional[subprocess.Popen] = None
        self.nodes: dict[str, subprocess.Popen] = {}  # node ip -> its `ray start`

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(os.path.join(self.log_dir, f"ray-{name}.log"), "a")
        try:
            return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args],
                                    stdout=log, stderr=subprocess.STDOUT, env=base_env(),
                                    start_new_session=True)
        finally:
            log.close()

    def start_head(self, cpus: int = 1) -> None:
        self.head = self._start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                                 "--num-cpus", str(cpus), "--include-dashboard", "false"], "head")
        self.wait_nodes(1)

    def add_node(self, ip: str = "127.0.0.2", cpus: int = 1) -> None:
        self.nodes[ip] = self._start(["--address", self.address, "--node-ip-address", ip,
                                      "--num-cpus", str(cpus)], ip)

    def kill_node(self, ip: str = "127.0.0.2") -> None:
        """SIGKILL the node's whole process group: its raylet and the workers on it."""
        stop_group(self.nodes.pop(ip, None), signal.SIGKILL)

    def alive_nodes(self) -> list[dict]:
        """[{"node_id", "ip", "cpus"}] of the cluster's alive nodes, from a separate driver."""
        script = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
                  "print('NODES=' + json.dumps([{'node_id': n['NodeID'], 'ip': n['NodeManagerAddress'], "
                  "'cpus': n['Resources'].get('CPU', 0)} for n in ray.nodes() if n['Alive']]))" % self.address)
        proc = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, env=base_env(),
                              timeout=120)
        for line in proc.stdout.splitlines():
            if line.startswith("NODES="):
                return json.loads(line[len("NODES="):])
        raise RuntimeError(f"cannot list the Ray nodes: {proc.stderr[-2000:]}")

    def wait_nodes(self, count: int, timeout_s: float = 120) -> list[dict]:
        found: list[dict] = []

        def enough() -> bool:
            nonlocal found
            try:
                found = self.alive_nodes()
            except RuntimeError:
                return False
            return len(found) == count

        _wait(enough, f"a Ray cluster of {count} node(s)", timeout_s, self.head,
              os.path.join(self.log_dir, "ray-head.log"))
        return found

    def stop(self) -> None:
        for ip in list(self.nodes):
            self.kill_node(ip)
        stop_group(self.head, wait_s=8)  # SIGTERM lets `ray start` end its processes; then SIGKILL
        self.head = None
