"""Wrong or unreachable servers end `libra run` within 15 s, in one line naming the flag and the
address, exit code 2, with Ray's own connection log hidden.

Each case starts the wrong server itself on 127.0.0.1 (a web server where Ray is expected, a
socket that accepts and never answers, a closed port) and runs the real `python -m
harness.cli` in a subprocess, as a user would. A PostgreSQL with a missing database is in
test_cluster.py, which starts one.
"""
from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def _web_server():
    """A real HTTP/1 server (not Ray, not MLflow) on a free loopback port; yields the port."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the test's output is the CLI's, not this server's
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _silent_server():
    """A socket that completes TCP handshakes (the kernel's backlog) and never says a word."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _closed_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again at once: nothing listens there


def _libra_run(study: str, tmp_path, *flags: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", study,
                           "--work-dir", str(tmp_path / "work"), *flags],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=100)
    return proc, time.monotonic() - start


def _one_line_naming(proc: subprocess.CompletedProcess, elapsed: float, *expected: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]  # no Ray log, no traceback
    for text in expected:
        assert text in lines[0], lines[0]
    # 15 s: the promise, including the interpreter's start and imports; each probe waits 5 s.
    assert elapsed < 15, f"took {elapsed:.1f} s: {lines[0]}"
    return lines[0]


@pytest.fixture
def study(write_study):
    return write_study("wrong", grid={"detector.balanced_l1_loss.enabled": [True]})


def test_address_of_a_web_server_is_not_a_ray_cluster(study, tmp_path):
    # Without the handshake check Ray retries its GCS connection for minutes, printing its log.
    with _web_server() as port:
        proc, elapsed = _libra_run(study, tmp_path, "--address", f"127.0.0.1:{port}")
    _one_line_naming(proc, elapsed, "--address", f"127.0.0.1:{port}", "not a Ray cluster")
    assert not (tmp_path / "work" / "mlflow.db").exists()  # nothing was started or recorded


def test_address_that_accepts_and_never_answers(study, tmp_path):
    with _silent_server() as port:
        proc, elapsed = _libra_run(study, tmp_path, "--address", f"ray://127.0.0.1:{port}")
    _one_line_naming(proc, elapsed, "--address", f"ray://127.0.0.1:{port}", "not a Ray cluster")


def test_tracking_uri_of_a_server_that_never_answers(study, tmp_path):
    with _silent_server() as port:
        proc, elapsed = _libra_run(study, tmp_path, "--tracking-uri", f"http://127.0.0.1:{port}")
    _one_line_naming(proc, elapsed, "--tracking-uri", f"http://127.0.0.1:{port}", "timed out")


def test_tracking_uri_of_a_web_server_that_is_not_mlflow(study, tmp_path):
    with _web_server() as port:
        proc, elapsed = _libra_run(study, tmp_path, "--tracking-uri", f"http://127.0.0.1:{port}")
    _one_line_naming(proc, elapsed, "--tracking-uri", f"http://127.0.0.1:{port}",
                     "not an MLflow tracking server", "HTTP 404")


def test_optuna_storage_with_nothing_listening(study, tmp_path):
    port = _closed_port()
    url = f"postgresql://optuna@127.0.0.1:{port}/optuna"
    proc, elapsed = _libra_run(study, tmp_path, "--optuna-storage", url)
    line = _one_line_naming(proc, elapsed, "--optuna-storage", f"127.0.0.1:{port}/optuna",
                            "cannot connect")
    assert "refused" in line.lower()


def test_optuna_storage_that_never_answers(study, tmp_path):
    with _silent_server() as port:
        url = f"postgresql://optuna:secret@127.0.0.1:{port}/optuna"
        proc, elapsed = _libra_run(study, tmp_path, "--optuna-storage", url)
    line = _one_line_naming(proc, elapsed, "--optuna-storage", f"127.0.0.1:{port}/optuna",
                            "cannot connect")
    assert "secret" not in line  # the password is not printed


def test_address_of_a_cluster_that_refuses_our_token(study, tmp_path):
    # A real head with Ray's default token authentication, and a driver holding another token.
    # Ray's client retries the handshake, logging each refusal: the user sees one line instead.
    # This one may take longer than 15 s: Ray decides, after its (shortened) retries.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cluster_parts

    env = cluster_parts.base_env()
    env.pop("RAY_AUTH_MODE")
    port = cluster_parts.free_port()
    head = subprocess.Popen([cluster_parts.RAY, "start", "--block", "--head", "--port", str(port),
                             "--num-cpus", "1", "--include-dashboard", "false",
                             "--disable-usage-stats"], env=dict(env, RAY_AUTH_TOKEN="a" * 32),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the GCS port answers once the head is up
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.5)
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", study, "--work-dir",
                               str(tmp_path / "work"), "--address", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, env=dict(env, RAY_AUTH_TOKEN="b" * 32),
                              cwd=str(tmp_path), timeout=100)
        elapsed = time.monotonic() - start
    finally:
        cluster_parts.stop_group(head, wait_s=5)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"--address 127.0.0.1:{port}" in lines[0] and "token" in lines[0], lines[0]
    assert elapsed < 60, f"took {elapsed:.0f} s"
