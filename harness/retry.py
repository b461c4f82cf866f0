"""Riding out a store's outage: the driver's calls to the MLflow server and to the Optuna
database, retried with backoff while the server is down, with one line telling the user.

A study that runs for days will see its tracking server or database restarted. A write that
fails because the other end is away (connection refused, a reset connection, a 5xx while the
server reconnects to its own database) is tried again, waiting 0.5 s, 1 s, 2 s ... up to
MAX_PAUSE_S between tries, for at most `wait_s()` seconds (LIBRA_STORE_WAIT_S, default 600);
then the run stops with a UserError that says how to resume. Any other error (a bad request,
a constraint) is raised at once: retrying it would only hide it.

Only calls that the store either applies completely or not at all are retried blindly; the two
that are not idempotent handle the retry themselves (harness.tracking's run creation looks for
the run a lost reply created; `RetryingStorage.set_trial_state_values` accepts a trial already
in the state it asked for).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional, TextIO, TypeVar

from harness.errors import UserError

T = TypeVar("T")

FIRST_PAUSE_S = 0.5
MAX_PAUSE_S = 10.0
DEFAULT_WAIT_S = 600.0


def wait_s() -> float:
    """How long a store may stay away before the run gives up (LIBRA_STORE_WAIT_S)."""
    text = os.environ.get("LIBRA_STORE_WAIT_S", "")
    try:
        return float(text) if text else DEFAULT_WAIT_S
    except ValueError:
        raise UserError(f"LIBRA_STORE_WAIT_S={text!r}: expected a number of seconds, e.g. 600") from None


def _chain(err: BaseException):
    seen = 0
    while err is not None and seen < 10:
        yield err
        err = err.__cause__ or err.__context__
        seen += 1


# MLflow's REST error codes that mean "the server, not the request, has a problem".
_TRANSIENT_MLFLOW_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                           "SERVICE_UNDER_MAINTENANCE", "DEADLINE_EXCEEDED"}


def is_transient(err: BaseException) -> bool:
    """Whether `err` says the store is unreachable or restarting (worth waiting for)."""
    for item in _chain(err):
        if isinstance(item, (ConnectionError, TimeoutError)):
            return True
        module = type(item).__module__ or ""
        name = type(item).__name__
        if module.startswith("sqlalchemy") and name in ("OperationalError", "InterfaceError",
                                                        "DisconnectionError", "TimeoutError"):
            return True
        if module.startswith("sqlalchemy") and getattr(item, "connection_invalidated", False):
            return True
        if module.startswith("psycopg") and name in ("OperationalError", "InterfaceError"):
            return True
        if module.startswith(("requests", "urllib3")) and name in (
                "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "RetryError",
                "MaxRetryError", "NewConnectionError", "ProtocolError", "ChunkedEncodingError"):
            return True
        if module.startswith("mlflow"):
            text = str(item)
            if "API request to" in text and ("failed with exception" in text or
                                             "failed with error code 5" in text):
                return True  # MLflow's wrapping of a connection failure or of a 5xx reply
            if name == "RestException" and getattr(item, "error_code", None) in _TRANSIENT_MLFLOW_CODES:
                return True  # the server answered, but is itself waiting for its database
    return False


class Waiter:
    """One store's retry policy and its one "waiting" line per outage.

    `what` names the store for the user ("the MLflow server at http://..."); `stream` is where
    the line goes (None: stdout at the time of the outage, beside the progress lines).
    """

    def __init__(self, what: str, stream: Optional[TextIO] = None):
        self.what = what
        self.stream = stream
        self.outages = 0  # outages ridden out (for tests and the final summary)
        self._down_since: Optional[float] = None

    def call(self, attempt: Callable[[int], T]) -> T:
        """`attempt(n)` (n = 0, 1, ...) until it returns, retrying transient errors."""
        pause = FIRST_PAUSE_S
        tries = 0
        while True:
            try:
                result = attempt(tries)
            except Exception as err:
                if not is_transient(err):
                    raise
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = now
                    self.outages += 1
                    limit = wait_s()
                    print(f"libra: {self.what} does not answer ({_short(err)}); waiting for it "
                          f"(retrying with backoff for up to {limit:g} s, nothing is lost)",
                          file=self.stream or sys.stdout, flush=True)
                elif now - self._down_since > wait_s():
                    raise UserError(f"{self.what} did not come back within {wait_s():g} s "
                                    f"({_short(err)}); start it again and re-run the same command "
                                    "to resume (finished trials are kept)") from None
                time.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE_S)
                tries += 1
                continue
            if self._down_since is not None:
                print(f"libra: {self.what} answers again after "
                      f"{time.monotonic() - self._down_since:.0f} s", file=self.stream or sys.stdout,
                      flush=True)
                self._down_since = None
            return result


def redacted(url: str) -> str:
    """A database URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: show it as given
        return url


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    for item in _chain(err):  # the innermost reason is the readable one (connection refused)
        inner = " ".join(str(item).split())
        if inner and len(inner) < len(text):
            text = inner
    return text[:160]


# ------------------------------------------------------------------------------------------
# Optuna.
# ------------------------------------------------------------------------------------------
def retrying_storage(storage: Any, what: str, stream: Optional[TextIO] = None) -> Any:
    """`storage` (an optuna BaseStorage, e.g. RDBStorage) with every call retried through an
    outage of its database. Optuna accepts any BaseStorage, so studies and trials use it as is."""
    from optuna.storages import BaseStorage

    waiter = Waiter(what, stream)

    def delegate(name: str) -> Callable[..., Any]:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return waiter.call(lambda _n: getattr(storage, name)(*args, **kwargs))

        method.__name__ = name
        return method

    names = {n for n in dir(BaseStorage) if not n.startswith("_")}
    attrs: dict[str, Any] = {n: delegate(n) for n in names}

    def set_trial_state_values(self: Any, trial_id: int, state: Any, values: Any = None) -> bool:
        return waiter.call(lambda n: set_state_attempt(storage, trial_id, state, values, n))

    attrs["set_trial_state_values"] = set_trial_state_values
    attrs["waiter"] = waiter
    attrs["inner"] = storage
    cls = type("RetryingStorage", (BaseStorage,), attrs)
    return cls()


def set_state_attempt(storage: Any, trial_id: int, state: Any, values: Any, n: int) -> bool:
    """Try `n` of finishing a trial: a retry (n > 0) first checks whether an earlier try
    committed before its reply was lost, and then accepts the trial as it is."""
    if n > 0 and state.is_finished() and storage.get_trial(trial_id).state == state:
        return True
    return storage.set_trial_state_values(trial_id, state, values)
