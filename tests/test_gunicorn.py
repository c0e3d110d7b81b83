"""The real thing: `make run`'s steps (migrate, import defaults, gunicorn with 2 workers) on loopback, a
new version activated and rolled back with the CLI under concurrent HTTP load. Zero failed requests and
every worker on the new version within 5 s."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BundleFactory, database_url_for
from tests.gunicorn_harness import app_env, flask_cli, gunicorn, request, wait_all_workers
from webapp import create_app
from webapp.serving.registry import activate, rollback


@pytest.fixture
def server(tmp_path: Path, make_bundle: BundleFactory) -> Iterator[tuple[int, dict[str, str], int]]:
    """`make run`'s steps: (port, env, master pid) of gunicorn serving the default bundle it imported."""
    defaults = tmp_path / "models"
    defaults.mkdir()
    shutil.copytree(make_bundle(seed=1), defaults / "test-tasks")
    env = app_env(tmp_path / "data", database_url_for(tmp_path / "data"), DEFAULT_BUNDLES_DIR=str(defaults))
    flask_cli(env, "db", "upgrade")
    assert "imported test-tasks-" in flask_cli(env, "models", "import-defaults")
    with gunicorn(env, tmp_path / "gunicorn.log") as proc:
        yield int(env["PORT"]), env, proc.pid


def test_swap_and_rollback_under_load_with_gunicorn(server, make_bundle: BundleFactory, abstracts: list[dict]) -> None:  # noqa: ANN001
    port, env, master = server
    status, health = request(port, "GET", "/healthz")
    v1 = health["active"]["test-tasks"]
    v2 = flask_cli(env, "models", "import", str(make_bundle(seed=2))).splitlines()[-1]

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
        operator = create_app(
            {
                "DATA_DIR": env["DATA_DIR"],
                "DATABASE_URL": env["DATABASE_URL"],
                "SECRET_KEY": "operator",
                "TESTING": True,
            }
        )
        with operator.app_context():
            activate(v2, actor="test")
            start = time.time()
        print(f"every worker on {v2} {wait_all_workers(port, master, v2, since=start):.2f}s after the commit")
        time.sleep(0.5)
        with operator.app_context():
            assert rollback("test-tasks", actor="test").id == v1
            start = time.time()
        print(f"every worker back on {v1} {wait_all_workers(port, master, v1, since=start):.2f}s after the commit")
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert served[v1] > 0 and served[v2] > 0 and set(served) == {v1, v2}
    ids_page = request(port, "GET", "/api/v1/taxonomies")[1]
    assert ids_page["taxonomies"][0]["active_version"] == v1
