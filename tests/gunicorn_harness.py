"""Real gunicorn on loopback, for the tests and benchmarks that need real processes: the environment `make run`
gives it, the flask CLI, plain HTTP on fresh connections, the workers' pids and memory, and the wait for every
worker to switch to a version (no pytest here, so bench/ scripts use it too)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path

from sqlalchemy import Connection, create_engine, select

from webapp.config import database_uri
from webapp.models import ModelVersion

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WARM_UP = {"abstract": "A warm-up abstract about parsing."}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_env(data_dir: Path, database_url: str, **settings: str) -> dict[str, str]:
    """Environment for the flask CLI and gunicorn on ``data_dir`` and ``database_url`` ("" is SQLite in it)."""
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": database_url,
        "DEFAULT_BUNDLES_DIR": str(data_dir / "no-default-models"),
        "PORT": str(free_port()),
        "WEB_CONCURRENCY": "2",
        "GUNICORN_THREADS": "4",
        "MODEL_POLL_SECONDS": "0.5",
        "PAPERTAG_ENV": "development",
        "RATELIMIT_ENABLED": "false",
        **settings,
    }
    env.pop("SECRET_KEY", None)  # development generates one shared key in DATA_DIR
    return env


def flask_cli(env: dict[str, str], *args: str) -> str:
    """Run ``flask --app wsgi ARGS`` as an operator would; its stdout, or a failure that shows its stderr."""
    done = subprocess.run(
        [str(BIN / "flask"), "--app", "wsgi", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"`flask {' '.join(args)}` failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def request(
    port: int, method: str, path: str, body: dict | None = None, timeout: float = 30, token: str | None = None
) -> tuple[int, dict]:
    """One request on a fresh connection, so the kernel spreads them over the workers; a page comes as {"html": ...}.
    ``token``: an API token sent as ``Authorization: Bearer``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json", "Connection": "close"} if body is not None else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        if response.getheader("Content-Type", "").startswith("text/html"):
            return response.status, {"html": payload.decode()}
        return response.status, json.loads(payload or b"{}")
    finally:
        conn.close()


@contextmanager
def gunicorn(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """``gunicorn -c gunicorn.conf.py wsgi:app`` on ``env["PORT"]``, once it answers a prediction; stopped after."""
    port = int(env["PORT"])
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=REPO, env=env, stdout=out, stderr=out
        )
        try:
            while True:
                assert proc.poll() is None, f"gunicorn exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                try:
                    if request(port, "POST", "/api/v1/predict", WARM_UP)[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            print(f"cold start to first prediction: {time.monotonic() - started:.2f}s")
            yield proc
        finally:
            proc.terminate()  # graceful: workers finish their requests (gunicorn's graceful_timeout is 30 s)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise


def worker_pids(master: int) -> set[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return {int(pid) for pid in children}


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process, or None once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None  # a zombie has no memory left


@contextmanager
def database(env: dict[str, str]) -> Iterator[Connection]:
    """A connection to the database the app in ``env`` uses, to check what it stored."""
    engine = create_engine(database_uri(env["DATABASE_URL"], env["DATA_DIR"]))
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def activated_at(env: dict[str, str], version: str) -> float:
    """Seconds since the epoch at which ``version`` was last made active (set just before the commit)."""
    with database(env) as conn:
        stamp = conn.execute(select(ModelVersion.activated_at).where(ModelVersion.id == version)).scalar()
    assert stamp is not None, f"{version} was never activated"
    return stamp.replace(tzinfo=UTC).timestamp()


def wait_all_workers(port: int, master: int, version: str, *, since: float, slug: str = "test-tasks") -> float:
    """Seconds from ``since`` (a ``time.time()``) until every worker of ``master`` reports ``version`` in /healthz.
    Nothing here bounds them: ``bench/swap_time.py`` measures the product's 5 s contract, and pytest-timeout stops
    a hung test."""
    pids = worker_pids(master)
    switched: set[int] = set()
    while switched != pids:
        status, body = request(port, "GET", "/healthz")
        assert status == 200, f"/healthz answered {status}: {body}"
        if body["worker"]["loaded"].get(slug) == version:
            switched.add(body["worker"]["pid"])
        else:
            time.sleep(0.05)  # leave the CPU to the worker that is loading
    return time.time() - since
