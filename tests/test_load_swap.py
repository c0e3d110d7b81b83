"""Real gunicorn (2 workers) on loopback under concurrent load: a version activated and rolled back with the CLI
fails no request and reaches every worker (the time it took is printed; bench/swap_time.py measures it) with
stable memory; a worker killed with SIGKILL loses only
its own requests, stores nothing half and is respawned; two instances on one PostgreSQL both switch."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.conftest import TEST_DATABASE_URL, BundleFactory, database_url_for
from tests.gunicorn_harness import (
    activated_at,
    app_env,
    database,
    flask_cli,
    gunicorn,
    request,
    rss_bytes,
    wait_all_workers,
    worker_pids,
)
from tests.tiny_bundle import LABELS

CLIENTS = 8
# A safety bound for each client loop; the tests stop the load as soon as they have seen what they need (a time
# bound here would end the load while a slow machine's test still waits for it).
LOAD_MAX_REQUESTS = 3000
# Each worker's RSS may grow this much over its level before the load (two versions loaded and freed, 4 threads).
RSS_GROWTH_BOUND = 150 * 1024 * 1024


@dataclass(frozen=True)
class Outcome:
    """One request of the load: when it started (``time.time()``) and what came back."""

    started: float
    ok: bool
    error: str = ""  # why it failed: a connection error (``connection: ...``) or a bad answer
    prediction_id: int | None = None
    version: str | None = None


def check_answer(status: int, body: dict) -> tuple[int, str]:
    """The prediction id and model version of a valid answer; raises ValueError saying what is wrong otherwise."""
    if status != 200:
        raise ValueError(f"HTTP {status}: {body}")
    [prediction] = body["predictions"]
    result = prediction["results"]["test-tasks"]
    if set(result["scores"]) != set(LABELS) or not set(result["labels"]) <= set(LABELS):
        raise ValueError(f"labels or scores do not match the taxonomy: {result}")
    return prediction["id"], result["model_version"]


class Load:
    """``CLIENTS`` threads posting one abstract each per request, until stopped or their bounds run out."""

    def __init__(self, port: int, abstracts: list[dict]) -> None:
        self.port = port
        self.abstracts = abstracts
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _client(self, n: int) -> None:
        for i in range(LOAD_MAX_REQUESTS):
            if self._stop.is_set():
                return
            # A distinct title per request, so the server's LRU cache never answers and every request runs the model.
            body = {"title": f"load {n}-{i}", "abstract": self.abstracts[(n + i) % len(self.abstracts)]["abstract"]}
            started = time.time()
            try:
                prediction_id, version = check_answer(*request(self.port, "POST", "/api/v1/predict", body))
            except (OSError, http.client.HTTPException) as exc:  # the connection dropped: no answer at all
                self.outcomes.append(Outcome(started, False, f"connection: {exc!r}"))
            except (ValueError, KeyError, TypeError) as exc:
                self.outcomes.append(Outcome(started, False, f"bad answer: {exc}"))
            else:
                self.outcomes.append(Outcome(started, True, prediction_id=prediction_id, version=version))

    def successes(self, since: float = 0.0) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.ok and o.started >= since]

    def failures(self) -> list[Outcome]:
        return [o for o in list(self.outcomes) if not o.ok]

    def wait_for(self, what: str, condition: Callable[[], bool]) -> None:
        """Poll until ``condition()`` holds while the load runs; ``what`` is printed first, so a hung test's report
        (pytest-timeout) says what it waited for. Nothing here asserts how long anything took: bench/swap_time.py
        measures that."""
        print(f"waiting for {what}")
        while not condition():
            time.sleep(0.05)


class RssSampler:
    """Samples the RSS of each of gunicorn's workers while running; ``peak_growth()`` per worker over its start."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.start: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> RssSampler:
        self._sample()
        self.start = dict(self.peak)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        for pid in worker_pids(self.master):
            rss = rss_bytes(pid)
            if rss is not None:
                self.peak[pid] = max(rss, self.peak.get(pid, 0))

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def report(self) -> str:
        mb = 1024 * 1024
        return ", ".join(
            f"worker {pid}: {self.start.get(pid, 0) / mb:.0f} -> peak {peak / mb:.0f} MB"
            for pid, peak in self.peak.items()
        )


@dataclass(frozen=True)
class Served:
    env: dict[str, str]
    port: int
    master: int
    v1: str  # active at start
    v2: str  # imported, not active


@pytest.fixture
def served(tmp_path: Path, make_bundle: BundleFactory) -> Iterator[Served]:
    """gunicorn with 2 workers serving v1 (seed 1) of test-tasks, v2 (seed 2) imported beside it."""
    data_dir = tmp_path / "data"
    env = app_env(data_dir, database_url_for(data_dir))
    flask_cli(env, "db", "upgrade")
    v1 = flask_cli(env, "models", "import", str(make_bundle(seed=1))).splitlines()[-1]
    v2 = flask_cli(env, "models", "import", str(make_bundle(seed=2))).splitlines()[-1]
    with gunicorn(env, tmp_path / "gunicorn.log") as proc:
        yield Served(env, int(env["PORT"]), proc.pid, v1, v2)


def test_cli_swap_and_rollback_under_load(served: Served, abstracts: list[dict]) -> None:
    port, master = served.port, served.master
    with RssSampler(master) as rss, Load(port, abstracts) as load:
        load.wait_for("successful requests before the swap", lambda: len(load.successes()) >= 2 * CLIENTS)
        flask_cli(served.env, "models", "activate", served.v2)
        took = wait_all_workers(port, master, served.v2, since=activated_at(served.env, served.v2))
        print(f"every worker on {served.v2} {took:.2f}s after the activation's commit")
        switched = time.time()
        load.wait_for(
            f"answers from {served.v2}", lambda: any(o.version == served.v2 for o in load.successes(switched))
        )

        assert flask_cli(served.env, "models", "rollback", "test-tasks").strip().endswith(served.v1)
        took = wait_all_workers(port, master, served.v1, since=activated_at(served.env, served.v1))
        print(f"every worker back on {served.v1} {took:.2f}s after the rollback's commit")
        back = time.time()
        load.wait_for("answers after the rollback", lambda: len(load.successes(back)) >= 2 * CLIENTS)

    failures = load.failures()
    assert failures == [], f"{len(failures)} of {len(load.outcomes)} requests failed during the swap: {failures[:5]}"
    served_by = Counter(o.version for o in load.outcomes)
    assert set(served_by) == {served.v1, served.v2}, f"versions that answered: {served_by}"
    late = [o for o in load.successes(back) if o.version != served.v1]
    assert late == [], f"requests started after the rollback settled were answered by another version: {late[:3]}"
    print(f"{len(load.outcomes)} requests, by version {dict(served_by)}; RSS {rss.report()}")
    grown = {pid: peak - rss.start[pid] for pid, peak in rss.peak.items() if pid in rss.start}
    assert set(grown) == worker_pids(master), f"workers changed during the swap: {rss.report()}"
    assert max(grown.values()) <= RSS_GROWTH_BOUND, f"worker memory grew more than 150 MB: {rss.report()}"


def process_gone(pid: int) -> bool:
    """Dead: reaped, or a zombie waiting for gunicorn's master to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def serves(port: int, pid: int, version: str) -> bool:
    """Whether the worker that answers this /healthz is ``pid`` and serves ``version``."""
    worker = request(port, "GET", "/healthz")[1].get("worker", {})
    return worker.get("pid") == pid and worker.get("loaded", {}).get("test-tasks") == version


def stored_load_predictions(env: dict[str, str]) -> tuple[set[int], list[int]]:
    """Ids of the load's stored predictions (titles ``load ...``) and of any stored without exactly one result."""
    with database(env) as conn:
        ids = set(conn.execute(text("SELECT id FROM predictions WHERE title LIKE 'load %'")).scalars())
        partial = conn.execute(
            text(
                "SELECT p.id FROM predictions p LEFT JOIN prediction_results r ON r.prediction_id = p.id "
                "GROUP BY p.id HAVING COUNT(r.id) <> 1"
            )
        )
        return ids, list(partial.scalars())


def test_sigkilled_worker_loses_only_its_own_requests(served: Served, abstracts: list[dict]) -> None:
    port, master = served.port, served.master
    with Load(port, abstracts) as load:
        load.wait_for("successful requests before the kill", lambda: len(load.successes()) >= 2 * CLIENTS)
        before = worker_pids(master)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        load.wait_for(f"death of worker {victim}", lambda: process_gone(victim))
        killed = time.time()
        load.wait_for("a respawned worker", lambda: len(worker_pids(master) - before) == 1)
        [respawned] = worker_pids(master) - before
        # It boots like any worker (imports the app, loads the model): as long as a start may take.
        load.wait_for(f"worker {respawned} serving {served.v1}", lambda: serves(port, respawned, served.v1))
        load.wait_for("requests after the kill", lambda: len(load.successes(killed)) >= 4 * CLIENTS)

    failures = load.failures()
    print(f"{len(load.outcomes)} requests; {len(failures)} failed with worker {victim}: {failures}")
    assert all(o.error.startswith("connection:") for o in failures), f"answers other than a dropped one: {failures}"
    late = [o for o in failures if o.started >= killed]
    assert late == [], f"requests that started after worker {victim} died failed: {late}"
    assert len(failures) <= CLIENTS, f"more failures than requests in flight at the kill: {failures}"
    stored, partial = stored_load_predictions(served.env)
    assert partial == [], f"predictions stored without exactly one result: {partial}"
    answered = {o.prediction_id for o in load.successes()}
    assert answered <= stored, f"answered but not stored: {sorted(answered - stored)[:10]}"
    # A killed request may have committed just before its reply was lost; nothing else is stored unanswered.
    unanswered = stored - answered
    assert len(unanswered) <= len(failures), f"{len(unanswered)} stored but unanswered, {len(failures)} failed"


def test_two_instances_on_one_postgresql_both_switch(tmp_path: Path, make_bundle: BundleFactory) -> None:
    """Two gunicorn masters with their own data dirs (no shared disk) on one database: one activation reaches both,
    and what one stores the other shows."""
    if not TEST_DATABASE_URL:
        pytest.skip("several instances share a PostgreSQL database; this runs in make test's PostgreSQL pass")
    url = database_url_for(tmp_path / "a")
    env_a = app_env(tmp_path / "a", url, WEB_CONCURRENCY="1")
    env_b = app_env(tmp_path / "b", url, WEB_CONCURRENCY="1")
    flask_cli(env_a, "db", "upgrade")
    v1 = flask_cli(env_a, "models", "import", str(make_bundle(seed=1))).splitlines()[-1]
    v2 = flask_cli(env_b, "models", "import", str(make_bundle(seed=2))).splitlines()[-1]
    with gunicorn(env_a, tmp_path / "a.log") as a, gunicorn(env_b, tmp_path / "b.log") as b:
        port_a, port_b = int(env_a["PORT"]), int(env_b["PORT"])
        for port in (port_a, port_b):
            assert request(port, "GET", "/healthz")[1]["worker"]["loaded"] == {"test-tasks": v1}
        flask_cli(env_b, "models", "activate", v2)
        since = activated_at(env_a, v2)
        for port, master in ((port_a, a.pid), (port_b, b.pid)):
            took = wait_all_workers(port, master, v2, since=since)
            print(f"instance on port {port} serves {v2} {took:.2f}s after the commit")
        ids = []
        for port in (port_a, port_b):
            body = {"title": f"instance {port}", "abstract": "We detect objects in aerial images with transformers."}
            prediction_id, version = check_answer(*request(port, "POST", "/api/v1/predict", body))
            assert version == v2, f"instance on port {port} answered with {version}"
            ids.append(prediction_id)
        assert ids[0] != ids[1], f"both instances stored prediction {ids[0]}"
        for port, (other_port, other_id) in ((port_a, (port_b, ids[1])), (port_b, (port_a, ids[0]))):
            status, page = request(port, "GET", f"/predictions/{other_id}")
            assert status == 200 and f"instance {other_port}" in page.get("html", ""), (
                f"instance on port {port} does not show prediction {other_id} stored by the other: {status}"
            )
