"""Checks of what a user names on the command line (paths, a Ray address, tracking and Optuna
URIs), made before any work starts.

A long run that fails at its end because `--out` cannot be written wastes the run, and a Ray
address with nothing behind it makes `ray.init` retry for a minute; these checks fail first, in
a UserError naming the flag (or study key) and the value.
"""
from __future__ import annotations

import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

from harness.errors import UserError


def _reason(err: OSError) -> str:
    return (err.strerror or str(err)).lower()


def writable_dir(flag: str, path: str, *, create: bool = True) -> str:
    """`path` as an absolute folder this process can write into (made when `create`).

    Raises UserError "FLAG PATH: ..." when it is a file, lies under a file, or the system
    refuses to create or write it (read-only or virtual filesystems, permissions).
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder; choose a folder")
    if not os.path.isdir(path):
        if not create:
            probe = _existing_parent(path)
            if not os.path.isdir(probe):
                raise UserError(f"{flag} {path}: {probe} is a file, so no folder can be made there")
            path_to_test = probe
        else:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as err:
                raise UserError(f"{flag} {path}: cannot create the folder ({_reason(err)}); "
                                "choose a writable place") from None
            path_to_test = path
    else:
        path_to_test = path
    try:
        # Creating a file is the only test that holds on every filesystem (os.access does not
        # see read-only mounts, /proc or /sys refuse files in writable-looking folders).
        with tempfile.NamedTemporaryFile(dir=path_to_test, prefix=".libra-write-test-"):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write there ({_reason(err)}); choose a writable "
                        "folder") from None
    return path


def writable_file(flag: str, path: str) -> str:
    """`path` as an absolute file path whose folder exists (or can be made) and is writable."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name, e.g. {path}/metrics.json")
    writable_dir(flag, os.path.dirname(path))
    return path


def _existing_parent(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


# ------------------------------------------------------------------------------------------
# Servers.
# ------------------------------------------------------------------------------------------
CONNECT_TIMEOUT_S = 5.0  # a cluster head on the same network answers in milliseconds


def check_ray_address(address: str, flag: str = "--address") -> None:
    """Fail in one line, within CONNECT_TIMEOUT_S, when nothing listens at a Ray address.

    `auto` and `local` are Ray's to resolve (it fails fast when no cluster runs); HOST:PORT and
    ray://HOST:PORT are probed with one TCP connection, so a wrong address does not leave
    `ray.init` retrying for a minute with its log on the screen.
    """
    if address in ("auto", "local"):
        return
    target = address[len("ray://"):] if address.startswith("ray://") else address
    if "://" in target:
        raise UserError(f"{flag} {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    host, sep, port_text = target.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UserError(f"{flag} {address}: expected auto, HOST:PORT or ray://HOST:PORT "
                        "(e.g. 10.0.0.5:6379, ray://head:10001)")
    try:
        with socket.create_connection((host.strip("[]"), int(port_text)), timeout=CONNECT_TIMEOUT_S) as conn:
            speaks_grpc = _answers_http2(conn)
    except OSError as err:
        why = "timed out" if isinstance(err, socket.timeout) else _reason(err)
        raise UserError(f"{flag} {address}: nothing answers there ({why}); start the cluster "
                        "(ray start --head) or drop the flag to run on a local cluster") from None
    if not speaks_grpc:
        # Something else listens there (a web server, a database, MLflow): Ray would retry
        # its GCS handshake for minutes, printing its connection log.
        raise UserError(f"{flag} {address}: something answers there but it is not a Ray cluster "
                        "(no gRPC reply); give the head's GCS address (port 6379 unless `ray start "
                        "--head --port` chose another) or ray://HEAD:10001")


# The client's HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _answers_http2(conn: socket.socket) -> bool:
    """Whether the server on `conn` speaks HTTP/2, as Ray's GCS and client server (gRPC) do:
    an HTTP/2 server's first frame is its SETTINGS frame (type 0x4, 9-byte header)."""
    conn.settimeout(CONNECT_TIMEOUT_S)
    try:
        conn.sendall(_H2_PREFACE)
        header = b""
        while len(header) < 9:
            chunk = conn.recv(9 - len(header))
            if not chunk:
                return False
            header += chunk
    except OSError:  # reset or silent: not a gRPC server
        return False
    return header[3] == 0x04


MLFLOW_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql",
                  "databricks", "databricks-uc")


def check_tracking_uri(uri: str, source: str, *, contact: bool = True) -> None:
    """A UserError naming `source` (e.g. "--tracking-uri", "tracking.uri of FILE") unless `uri`
    is one MLflow can open; with `contact`, an http(s) server must answer its /health page.
    """
    scheme = urllib.parse.urlparse(uri).scheme.split("+")[0].lower()
    if scheme and scheme not in MLFLOW_SCHEMES and not (len(scheme) == 1 and os.name == "nt"):
        raise UserError(f"{source} {uri}: unknown scheme {scheme!r}; MLflow takes "
                        f"{', '.join(s + '://' for s in MLFLOW_SCHEMES[:5])} or a folder path")
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if path and path != ":memory:":
            writable_dir(source, os.path.dirname(path) or ".", create=False)
    if contact and scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_S) as reply:
                reply.read()
        except urllib.error.HTTPError as err:  # something answers, but not MLflow's /health
            raise UserError(f"{source} {uri}: the server there is not an MLflow tracking server "
                            f"(its /health page answered HTTP {err.code}); give the MLflow "
                            "server's address (mlflow server --host ... --port ...)") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(f"cannot reach MLflow tracking server at {uri} (given by {source}): "
                            f"{reason}; start it or drop {source}") from None


def sqlalchemy_url(url: str) -> str:
    """`url` with an installed driver. To SQLAlchemy postgresql:// means psycopg2; this project
    installs psycopg (3), so a bare postgresql:// gets +psycopg unless psycopg2 is installed."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg"):
            return "postgresql+psycopg://" + rest
    return url


def check_optuna_storage(url: str, source: str, *, contact: bool = False) -> None:
    """A UserError naming `source` unless `url` is a database URL whose driver is installed;
    with `contact`, unless one connection opens within CONNECT_TIMEOUT_S.

    Only the form without `contact` (--dry-run): Optuna would create its tables on first use,
    and a connection alone creates nothing.
    """
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    from sqlalchemy.pool import NullPool

    try:
        parsed = make_url(sqlalchemy_url(url))
        dialect = parsed.get_dialect()
    except NoSuchModuleError:  # (a subclass of ArgumentError)
        raise UserError(f"{source} {url}: no database driver for this scheme; use postgresql://, "
                        "mysql:// or sqlite:///") from None
    except ArgumentError:
        raise UserError(f"{source} {url}: not a database URL; expected e.g. "
                        "postgresql://user@host/db or sqlite:////abs/optuna.db") from None
    try:
        dialect.import_dbapi() if hasattr(dialect, "import_dbapi") else dialect.dbapi()
    except ImportError as err:
        raise UserError(f"{source} {url}: its driver is not installed ({err.name or err}); "
                        "pip install it (e.g. psycopg[binary] for postgresql)") from None
    if not contact or parsed.get_backend_name() == "sqlite":
        return
    shown = parsed.render_as_string(hide_password=True)
    timeout = ({"connect_timeout": int(CONNECT_TIMEOUT_S)}
               if parsed.get_backend_name() in ("postgresql", "mysql") else {})
    engine = create_engine(parsed, connect_args=timeout, poolclass=NullPool)
    try:
        with engine.connect():
            pass
    except Exception as err:  # refused, timed out, no such database or role, bad password
        reason = err
        while reason.__cause__ is not None:
            reason = reason.__cause__
        text = " ".join(str(reason).split())
        raise UserError(f"{source} {shown}: cannot connect to the Optuna database ({text[:200]}); "
                        "start the server, create the database, or fix the URL") from None
    finally:
        engine.dispose()


def value_source(flag: str, flag_value: Optional[str], key: str, study_path: str,
                 overrides: list[str]) -> str:
    """Where a setting came from, for messages: the flag, a --set of the key, or the file."""
    if flag_value is not None:
        return flag
    if any(o.partition("=")[0].strip() == key for o in overrides):
        return f"--set {key}"
    return f"{key} of {study_path}"
