"""The real thing: `make run`'s steps (migrate, import defaults, gunicorn with 2 workers) on loopback, a
new version activated and rolled back with the CLI under concurrent HTTP load. Zero failed requests and
every worker on the new version within 5 s."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import BundleFactory
from webapp import create_app
from webapp.registry import activate, rollback

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One request on a fresh connection, so the kernel spreads them over the workers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        payload = json.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json", "Connection": "close"} if body is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def worker_pids(master: int) -> set[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return {int(pid) for pid in children}


@pytest.fixture
def server(tmp_path: Path, make_bundle: BundleFactory):  # noqa: ANN201 - yields (port, env, master pid)
    defaults = tmp_path / "models"
    defaults.mkdir()
    shutil.copytree(make_bundle(seed=1), defaults / "test-tasks")
    port = free_port()
    env = {
        **os.environ,
        "DATA_DIR": str(tmp_path / "data"),
        "DEFAULT_BUNDLES_DIR": str(defaults),
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "GUNICORN_THREADS": "4",
        "MODEL_POLL_SECONDS": "0.5",
        "PAPERTAG_ENV": "development",
        "RATELIMIT_ENABLED": "false",
    }
    env.pop("SECRET_KEY", None)  # development generates one shared key in DATA_DIR
    flask = [str(BIN / "flask"), "--app", "wsgi"]
    subprocess.run([*flask, "db", "upgrade"], cwd=REPO, env=env, check=True, capture_output=True)
    out = subprocess.run([*flask, "models", "import-defaults"], cwd=REPO, env=env, check=True, capture_output=True)
    assert b"imported test-tasks-" in out.stdout
    started = time.monotonic()
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], cwd=REPO, env=env, stdout=log, stderr=log
    )
    try:
        while True:
            assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()
            try:
                status, _ = request(port, "POST", "/api/v1/predict", {"abstract": "A warm-up abstract about parsing."})
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() - started < 30, "gunicorn did not answer within 30 s"
            time.sleep(0.1)
        print(f"cold start to first prediction: {time.monotonic() - started:.2f}s")
        yield port, env, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def wait_all_workers(port: int, master: int, version: str, start: float) -> float:
    """Seconds from ``start`` (the activation's commit) until every worker serves ``version``."""
    pids = worker_pids(master)
    assert len(pids) == 2
    switched: set[int] = set()
    while switched != pids:
        elapsed = time.monotonic() - start
        assert elapsed < 5.0, f"workers {pids - switched} not on {version} after 5 s"
        status, body = request(port, "GET", "/healthz")
        assert status == 200
        if body["worker"]["loaded"].get("test-tasks") == version:
            switched.add(body["worker"]["pid"])
    return time.monotonic() - start


def test_swap_and_rollback_under_load_with_gunicorn(server, make_bundle: BundleFactory, abstracts: list[dict]) -> None:  # noqa: ANN001
    port, env, master = server
    flask = [str(BIN / "flask"), "--app", "wsgi"]
    status, health = request(port, "GET", "/healthz")
    v1 = health["active"]["test-tasks"]
    imported = subprocess.run(
        [*flask, "models", "import", str(make_bundle(seed=2))], cwd=REPO, env=env, check=True, capture_output=True
    )
    v2 = imported.stdout.decode().strip().splitlines()[-1]

    stop = threading.Event()
    failures: list[str] = []
    served: Counter[str] = Counter()

    def hammer(n: int) -> None:
        i = n
        while not stop.is_set():
            i += 1
            try:
                status, body = request(port, "POST", "/api/v1/predict", {"abstract": abstracts[i % 20]["abstract"]})
            except OSError as exc:
                failures.append(repr(exc))
                continue
            if status != 200:
                failures.append(f"{status} {body}")
            else:
                served[body["predictions"][0]["results"]["test-tasks"]["model_version"]] += 1

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        # Activate here rather than through the CLI so the clock starts at the commit, not at the CLI's start-up
        # (the CLI's activate and rollback are tested in test_registry.py).
        operator = create_app({"DATA_DIR": env["DATA_DIR"], "SECRET_KEY": "operator", "TESTING": True})
        with operator.app_context():
            activate(v2, actor="test")
            start = time.monotonic()
        print(f"every worker on {v2} {wait_all_workers(port, master, v2, start):.2f}s after the commit")
        time.sleep(0.5)
        with operator.app_context():
            assert rollback("test-tasks", actor="test").id == v1
            start = time.monotonic()
        print(f"every worker back on {v1} {wait_all_workers(port, master, v1, start):.2f}s after the commit")
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert served[v1] > 0 and served[v2] > 0 and set(served) == {v1, v2}
    ids_page = request(port, "GET", "/api/v1/taxonomies")[1]
    assert ids_page["taxonomies"][0]["active_version"] == v1
