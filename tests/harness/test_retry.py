"""harness.retry: which errors are worth waiting for (real errors from real clients pointed at a
closed port), the one waiting line, the time limit, and the Optuna storage wrapper on a real
RDB storage. The outages themselves (a stopped MLflow server, a restarted PostgreSQL) are in
test_cluster.py."""
from __future__ import annotations

import contextlib
import io
import socket

import optuna
import pytest

from harness import retry
from harness.errors import UserError


def _closed_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as err:  # the real error the client raises
        return err
    raise AssertionError("expected an error")


def test_errors_of_an_absent_server_are_transient_and_mistakes_are_not(monkeypatch, tmp_path):
    import psycopg
    from mlflow import MlflowClient

    port = _closed_port()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not in minutes
    down = _raised(lambda: MlflowClient(f"http://127.0.0.1:{port}").search_experiments())
    assert retry.is_transient(down), repr(down)
    refused = _raised(lambda: psycopg.connect(f"postgresql://u@127.0.0.1:{port}/db", connect_timeout=2))
    assert retry.is_transient(refused)
    assert retry.is_transient(ConnectionRefusedError())
    # A bad request to a store that is there: retrying would only hide it.
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    missing = _raised(lambda: client.get_run("0" * 32))
    assert not retry.is_transient(missing), repr(missing)
    assert not retry.is_transient(ValueError("bad value"))


def test_waiter_says_once_that_it_waits_and_returns_the_result(monkeypatch):
    monkeypatch.setattr(retry, "FIRST_PAUSE_S", 0.01)
    out = io.StringIO()
    waiter = retry.Waiter("the test store", out)
    failures = iter([ConnectionRefusedError("refused"), ConnectionResetError("reset")])

    def attempt(n):
        error = next(failures, None)
        if error is not None:
            raise error
        return n

    assert waiter.call(attempt) == 2  # the third try (n = 2) succeeded
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "the test store does not answer" in lines[0]
    assert "answers again" in lines[1] and waiter.outages == 1


def test_waiter_raises_a_mistake_at_once_and_gives_up_after_the_limit(monkeypatch):
    monkeypatch.setattr(retry, "FIRST_PAUSE_S", 0.01)
    waiter = retry.Waiter("the test store", io.StringIO())
    calls = []

    def mistake(n):
        calls.append(n)
        raise KeyError("no such run")

    with pytest.raises(KeyError):
        waiter.call(mistake)
    assert calls == [0]

    monkeypatch.setenv("LIBRA_STORE_WAIT_S", "0.05")

    def down(n):
        raise ConnectionRefusedError("refused")

    with pytest.raises(UserError, match="did not come back within 0.05 s.*re-run the same command"):
        waiter.call(down)


def test_retrying_storage_is_an_optuna_storage(tmp_path):
    inner = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/o.db")
    storage = retry.retrying_storage(inner, "the test database", io.StringIO())
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    trial.set_user_attr("k", "v")
    study.tell(trial, 1.5)
    again = optuna.load_study(study_name="s", storage=storage)
    [frozen] = again.get_trials()
    assert frozen.value == 1.5 and frozen.user_attrs == {"k": "v"}
    # A retried tell whose first try had committed: the trial is already COMPLETE. The first
    # try of the same call fails as Optuna does; the retry accepts the trial as it is.
    from optuna.trial import TrialState

    with pytest.raises(RuntimeError):
        retry.set_state_attempt(inner, frozen._trial_id, TrialState.COMPLETE, [1.5], 0)
    assert retry.set_state_attempt(inner, frozen._trial_id, TrialState.COMPLETE, [1.5], 1) is True
    with pytest.raises(RuntimeError):  # a different state is still refused
        retry.set_state_attempt(inner, frozen._trial_id, TrialState.FAIL, None, 1)
