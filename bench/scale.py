"""papertag at scale (issue 13 point 4): a history of N predictions on SQLite and PostgreSQL, measured against a
real server, and a CSV batch on the job engine with one and with two worker processes.

Per database (``--databases``) the history grows to each size of ``--sizes`` in turn (10k, then 90k more, ...):

1. **Fill.** The site is set up as an operator does (``flask db upgrade``, ``flask models import-defaults``: the
   shipped models/research-tasks and models/arxiv-categories, ``flask users create``, ``flask tokens create``), then
   ``bench/storage.py``'s ``fill`` writes the predictions as the app's storage writes them (prediction, one result
   per taxonomy, predicted labels, one int8 embedding per prediction; the migrations' full-text triggers or
   generated column index them). Real model outputs, recycled: the shipped models answer ``--scored`` real abstracts
   (spread over /work/shared/data's Papers-with-Code and arXiv sets, else the test fixtures) and each prediction
   takes one of those answers with small noise (logits + N(0, 0.3), the embedding + 25% of its own spread), its
   labels decided again by the model's own rule (thresholds, best guess), so the label distribution is the models'.
   The text is one of ``--texts`` real abstracts, with another real paper's title after the first pass, so
   full-text search finds real words in realistic proportions (text and scores are recycled independently).
   ``--reviewed`` of the predictions are reviewed through the app's review command (half accepted, a third
   corrected, the rest skipped; one or both taxonomies, by two curators), so the queue and the label filter
   (corrections applied) have work. PostgreSQL is VACUUMed and ANALYZEd after each fill, as its autovacuum would
   in time (a million rows bulk-loaded and only ANALYZEd listed the history page in 365 / 450 ms, p50 / p95, against
   89 / 112 once vacuumed: index-only reads need the visibility map a VACUUM writes); SQLite is left as the app
   leaves it (no ANALYZE).
2. **Size.** The database's used bytes (``bench/storage.py``'s ``used_bytes``: SQLite pages in use, PostgreSQL's
   tables with TOAST and indexes) grown since before the first fill, per stored (prediction, taxonomy).
3. **Speed**, against gunicorn started as ``make run`` starts it (``gunicorn.conf.py``: 2 workers x 2 threads;
   rate limits off so the bench is not refused), one client, a fresh connection per request, signed in as an
   admin: p50/p95 of the history page (pages 1-5), the label filter (a label the models give, any frequency), the
   full-text search (two neighbouring words of a real title), the review queue (all taxonomies or one), the label
   filter on the label most results carry (every fourth round: it has the most rows to count and sort), similar
   papers (``GET /api/v1/predictions/<id>/similar``, random ids) and ``POST /api/v1/predict`` of 64 abstracts,
   taking turns round after round so a change of load hits them alike; the first calls (each worker loads what
   it caches) are reported apart as "cold". Then export throughput: rows/s of ``GET /api/v1/predictions.csv``
   and ``.jsonl`` over the first ``--export-rows`` rows, and the web workers' RSS.

Then (unless ``--skip-batch``) the job engine: a fresh site on ``--batch-database`` with ``min(--sizes)``
predictions, Huey on a Redis server of its own (``tests/services/redis.sh`` under ``--redis-root``, stopped after),
``--batch-rows`` abstracts uploaded through ``POST /batches`` as CSV files of at most ``--batch-file-rows`` rows
(the app takes ``BATCH_MAX_ROWS`` = 5,000 a file; the workers share each file chunk by chunk), tagged by one ``flask
jobs worker`` process, then again by two; first with the batch alone, then again with a person browsing beside it (a
client requesting history, label filter, search and queue pages in turn, one every ``--probe-interval`` seconds;
``--batch-runs`` keeps either half alone). It reports each run's steady rate (abstracts/s between 10% and 90% done),
the speed-up (two / one, same run) with the batch alone (the engine's own scaling) and with the pages (on a 2-core
machine their CPU comes out of the second worker's core), the web pages' p95 while each batch runs against idle, and
the CPU time each role used per abstract over the whole run (job workers, database server, queue, web server, this
bench, every other process): on one machine the second worker shares its cores with all of them.

Every block prints the database, N and ``os.getloadavg()`` at its start and end; ``--json`` writes every figure.
On a shared machine quote the figures with those loads.

    python bench/scale.py [--sizes 10000,100000,1000000] [--databases sqlite,postgresql] [--postgres URL]
        [--batch-rows 100000] [--skip-batch] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import http.client
import io
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import psutil
from flask import current_app

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import Connection, Select, Table, create_engine, func, insert, literal, select, text  # noqa: E402

from bench import storage  # noqa: E402
from bench.search import queries  # noqa: E402
from tests.gunicorn_harness import BIN, app_env, gunicorn, rss_bytes, worker_pids  # noqa: E402
from webapp.config import database_uri  # noqa: E402
from webapp.curation.corrections import ReviewCommand, ReviewPart  # noqa: E402
from webapp.evidence import similar_index  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.jobs.engine import EXTENSION_KEY as JOB_ENGINE  # noqa: E402
from webapp.models import (  # noqa: E402
    BatchJob,
    Embedding,
    PredictedLabel,
    Prediction,
    PredictionResult,
    Taxonomy,
    User,
)
from webapp.serving.inference import LoadedModel  # noqa: E402
from webapp.serving.registry import live_models  # noqa: E402

PASSWORD = "scale-bench-password-1"
ADMIN = "scale-admin"
CURATOR = "scale-curator"
LOGIT_NOISE = 0.3  # standard deviation added to each recycled logit
EMBEDDING_NOISE = 0.25  # of the embedding's own per-component spread
PAGE_FIGURES = ("history page", "label filter", "full-text search", "review queue")
TOP_LABEL = "top-label filter"  # the label filter on the label most results carry: the most rows to count and sort
FIGURES = (*PAGE_FIGURES, TOP_LABEL, "similar papers", "predict 64")
COLD_CALLS = 4  # first calls per figure reported apart: each worker loads and caches (models, labels, indexes)
BATCH_POLL = 0.5
BATCH_RUNS = {"alone": (False,), "paged": (True,), "both": (False, True)}  # --batch-runs: with pages?
COPY_BLOCK = 50_000  # predictions copied per statement set (and commit) beyond --written


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def ms(seconds: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(seconds), q)) * 1000, 1)


# --- the corpus: real abstracts, real model answers recycled with noise ----------------------------------------


@dataclasses.dataclass(frozen=True)
class Served(storage.Bundle):
    """A shipped bundle as the site imported it: results are stored under its real version id."""

    imported_id: str = ""

    @property
    def version_id(self) -> str:
        return self.imported_id


class Papers(Sequence):
    """Paper ``i`` (any ``i``): real abstract ``i % T``, its own title on the first pass and another real paper's
    after, so each pass over the texts makes new (title, abstract) pairs."""

    def __init__(self, texts: list[dict]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict:  # type: ignore[override]
        t = len(self.texts)
        paper = self.texts[i % t]
        titled = self.texts[(i + (i // t) * 7919) % t]
        return {"title": titled.get("title") or paper.get("title"), "abstract": paper["abstract"]}


class NoisyAnswers(Sequence):
    """Answer set ``i`` (any ``i``): real answer set ``i % S`` with seeded noise on every logit and on the shared
    embedding, its labels decided again by each model's own rule."""

    def __init__(self, base: list[dict[str, storage.Answer]], models: dict[str, LoadedModel], seed: int = 13) -> None:
        self.base, self.models, self.seed = base, models, seed
        self.spread = [{slug: EMBEDDING_NOISE * float(np.std(a.embedding)) for slug, a in s.items()} for s in base]
        self.logits = [
            {
                slug: np.log(np.clip(a.probabilities, 1e-6, 1 - 1e-6) / np.clip(1 - a.probabilities, 1e-6, 1))
                for slug, a in s.items()
            }
            for s in base
        ]

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict[str, storage.Answer]:  # type: ignore[override]
        k = i % len(self.base)
        rng = np.random.default_rng((self.seed, i))
        shift: np.ndarray | None = None
        out = {}
        for slug, answer in self.base[k].items():
            vector = np.asarray(answer.embedding, dtype=np.float32)
            if shift is None:  # one draw for the prediction: taxonomies sharing an encoder keep sharing its vector
                shift = rng.normal(0.0, self.spread[k][slug], vector.shape).astype(np.float32)
            logits = self.logits[k][slug] + rng.normal(0.0, LOGIT_NOISE, len(answer.probabilities))
            probabilities = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
            decision = self.models[slug].decide(probabilities, answer.domain)
            out[slug] = dataclasses.replace(
                answer,
                probabilities=probabilities,
                embedding=vector + shift,
                labels=decision.labels,
                best_guess=decision.best_guess,
                off_domain=decision.off_domain,
            )
        return out


@dataclasses.dataclass
class Corpus:
    texts: list[dict]
    bundles: list[storage.Bundle]
    answers: NoisyAnswers
    labels: list[str]  # labels the models give (the label filter's picks)
    searches: list[str]

    @classmethod
    def build(cls, n_texts: int, n_scored: int) -> Corpus:
        texts = storage.read_papers(n_texts)
        bundles = storage.shipped_bundles()
        models = storage.load_models(bundles)
        scored = texts[:: max(1, len(texts) // n_scored)][:n_scored]  # spread over both data sets
        started = time.perf_counter()
        base = storage.model_answers(bundles, scored, models)
        print(f"the shipped models answered {len(scored)} real abstracts in {time.perf_counter() - started:.1f} s")
        labels = sorted({label for answer_set in base for a in answer_set.values() for label in a.labels})
        return cls(texts, bundles, NoisyAnswers(base, models), labels, queries(texts, 200))


# --- one site: set up by the CLI, filled in-process, served by gunicorn ----------------------------------------


def cli(env: dict[str, str], *args: str, stdin: str = "") -> str:
    done = subprocess.run(
        [str(BIN / "flask"), "--app", "wsgi", *args], cwd=REPO, env=env, input=stdin, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"`flask {' '.join(args)}` failed:\n{done.stderr[-3000:]}")
    return done.stdout


class Site:
    """A papertag site in its own DATA_DIR on SQLite or on a fresh PostgreSQL database (dropped by ``close``)."""

    def __init__(self, dialect: str, postgres: str, work: Path, **settings: str) -> None:
        self.dialect = dialect
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"papertag-scale-{dialect}-", dir=work))
        self.url, self.admin_url = storage.fresh_postgres(postgres) if dialect == "postgresql" else ("", "")
        # make run's settings: gunicorn.conf.py's 2 workers x 2 threads, the shipped models as the defaults.
        self.env = app_env(
            self.data_dir,
            self.url,
            GUNICORN_THREADS="2",
            MODEL_POLL_SECONDS="1.0",
            DEFAULT_BUNDLES_DIR=str(REPO / "models"),
            LOG_LEVEL="warning",
            **settings,
        )
        cli(self.env, "db", "upgrade")
        cli(self.env, "models", "import-defaults")
        cli(self.env, "users", "create", ADMIN, "--role", "admin", stdin=PASSWORD + "\n")
        self.token = cli(self.env, "tokens", "create", ADMIN, "--role", "admin").strip().splitlines()[-1]
        self.filled = 0
        self.app = storage.bench_app(self.data_dir, self.url)
        with self.app.app_context(), db.engine.connect() as connection:
            self.empty_bytes = storage.used_bytes(connection)

    def served(self, bundles: list[storage.Bundle]) -> list[Served]:
        with self.app.app_context():
            active = dict(db.session.execute(select(Taxonomy.slug, Taxonomy.active_version_id)).all())
        return [
            Served(**{f.name: getattr(b, f.name) for f in dataclasses.fields(b)}, imported_id=active[b.slug])
            for b in bundles
        ]

    def grow(self, corpus: Corpus, n: int, args: argparse.Namespace) -> dict[str, Any]:
        """Fill up to ``n`` predictions (written by the app's storage code up to ``--written``, copied in SQL
        beyond), review ``--reviewed`` of the new ones; the fill's and the size's figures."""
        written = max(0, min(n, args.written) - self.filled)
        copied = n - self.filled - written
        bundles = self.served(corpus.bundles)
        started = time.perf_counter()
        with self.app.app_context():
            ids = dict(db.session.execute(select(Taxonomy.slug, Taxonomy.id)).all())
            with db.engine.connect() as connection:
                before = connection.execute(select(func.max(Embedding.id))).scalar_one() or 0
                storage.fill(
                    connection, "now", bundles, ids, Papers(corpus.texts), corpus.answers, written, first=self.filled
                )
                filled = time.perf_counter() - started
                replicate(connection, args.written, self.filled + written, copied)
                copy_s = time.perf_counter() - started - filled
                similar_index.add_stored(connection, after=before)  # what the app's flush does for its own writes
                connection.commit()
                index_s = time.perf_counter() - started - filled - copy_s
            reviews = review(self.filled, n - self.filled, args.reviewed)
            with db.engine.connect() as connection:
                if connection.dialect.name == "postgresql":
                    connection.commit()  # VACUUM runs outside a transaction
                    connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
                grown = int(storage.used_bytes(connection) - self.empty_bytes)
                results = connection.execute(select(func.count()).select_from(PredictionResult)).scalar_one()
            db.session.remove()
            db.engine.dispose()
        self.filled = n
        return {
            "written": written,
            "fill_s": round(filled, 1),
            "fill_per_s": round(written / filled) if written else None,
            "copied": copied,
            "copy_s": round(copy_s, 1),
            "index_s": round(index_s, 1),
            "reviews": reviews,
            "review_s": round(time.perf_counter() - started - filled - copy_s - index_s, 1),
            "stored_results": results,
            "bytes": grown,
            "bytes_per_result": round(grown / results),
        }

    def requests(self, corpus: Corpus, seed: int = 5) -> Requests:
        """Requests to time on this site: its taxonomies, 1,000 of its predictions at random (similar papers)."""
        with self.app.app_context():
            slugs = list(db.session.scalars(select(Taxonomy.slug).order_by(Taxonomy.slug)))
            ids = list(db.session.scalars(select(Prediction.id).order_by(func.random()).limit(1000)))
            count = func.count(PredictedLabel.id)
            top = db.session.scalar(select(PredictedLabel.label).group_by(PredictedLabel.label).order_by(count.desc()))
            db.session.remove()
            db.engine.dispose()
        return Requests(corpus, slugs, ids, top or "", seed)

    def close(self) -> None:
        with self.app.app_context():
            live_models().stop()
            db.engine.dispose()
        self.app.extensions[JOB_ENGINE].stop()
        if self.url:
            storage.drop_postgres(self.url, self.admin_url)
        subprocess.run(["rm", "-rf", str(self.data_dir)], check=False)


def replicate(connection: Connection, written: int, first: int, n: int) -> None:
    """Predictions ``first .. first + n - 1`` of the fill as SQL copies of predictions ``0 .. written - 1``
    (``i`` copies ``i % written``): every row the app writes for them (the prediction, whose full-text entry the
    trigger or generated column makes; its results, predicted labels and embedding) under new ids, ``i`` seconds
    after the fill's start, with the title of another written prediction and a distinct text hash. Scores and
    embeddings repeat the written ones exactly. Commits per block."""
    p, r, e, pl = (m.__table__ for m in (Prediction, PredictionResult, Embedding, PredictedLabel))
    postgres = connection.dialect.name == "postgresql"
    done = 0
    while done < n:
        start = first + done
        source = start % written
        count = min(COPY_BLOCK, n - done, written - source)
        shift = start - source  # seconds (and fill numbers) the copy is after its source
        since = storage.FILL_START + timedelta(seconds=source)
        ids = select(p.c.id).where(
            p.c.created_at >= since, p.c.created_at < since + timedelta(seconds=count), p.c.source == "batch"
        )
        results = select(r.c.id).where(r.c.prediction_id.in_(ids))
        vectors = select(r.c.embedding_id).where(r.c.prediction_id.in_(ids))

        def offset(table: Table, of: Select) -> int:
            """Added to a copied row's id: past every id there now."""
            low = connection.execute(select(func.min(table.c.id)).where(table.c.id.in_(of))).scalar_one()
            return connection.execute(select(func.max(table.c.id))).scalar_one() - low + 1

        p_off, r_off, e_off = offset(p, ids), offset(r, results), offset(e, vectors)
        connection.execute(
            insert(e).from_select(["id", "vector"], select(e.c.id + e_off, e.c.vector).where(e.c.id.in_(vectors)))
        )
        other = p.alias("other")
        title = (
            select(other.c.title)
            .where(other.c.id == p.c.id - (p.c.id % 1000) + ((p.c.id + 7 * (start // written)) % 1000))
            .scalar_subquery()
        )
        if postgres:
            created = p.c.created_at + timedelta(seconds=shift)
        else:  # as SQLAlchemy writes a DateTime on SQLite (the fill's times are whole seconds)
            created = func.strftime("%Y-%m-%d %H:%M:%S", p.c.created_at, f"+{shift} seconds") + ".000000"
        copies = {
            "id": p.c.id + p_off,
            "title": func.coalesce(title, p.c.title),
            "text_sha256": literal(f"{start:012x}") + func.substr(p.c.text_sha256, 13),
            "created_at": created,
        }
        columns = [c.name for c in p.columns if c.name != "batch_id"]
        connection.execute(
            insert(p).from_select(columns, select(*(copies.get(c, p.c[c]) for c in columns)).where(p.c.id.in_(ids)))
        )
        moved = {
            "id": r.c.id + r_off,
            "prediction_id": r.c.prediction_id + p_off,
            "embedding_id": r.c.embedding_id + e_off,
        }
        columns = [c.name for c in r.columns]
        connection.execute(
            insert(r).from_select(columns, select(*(moved.get(c, r.c[c]) for c in columns)).where(r.c.id.in_(results)))
        )
        connection.execute(
            insert(pl).from_select(
                ["result_id", "prediction_id", "taxonomy_id", "label"],
                select(pl.c.result_id + r_off, pl.c.prediction_id + p_off, pl.c.taxonomy_id, pl.c.label).where(
                    pl.c.result_id.in_(results)
                ),
            )
        )
        if postgres:  # explicit ids: move each sequence past them
            for table in (p, r, e):
                connection.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                        f"(SELECT max(id) FROM {table.name}))"
                    )
                )
        connection.commit()
        done += count


def review(first: int, n: int, share: float) -> int:
    """Review every (1/share)-th of predictions ``first .. first + n - 1`` of the fill through the review command:
    accepted (1/2), corrected (1/3: a label dropped or another added) or skipped, in one or both taxonomies, by one
    of two curators. Returns how many predictions were reviewed."""
    if share <= 0:
        return 0
    step = max(1, round(1 / share))
    rng = random.Random(first)
    users = []
    for name, role in ((ADMIN, "admin"), (CURATOR, "curator")):
        user = db.session.scalar(select(User).where(User.name == name))
        if user is None:
            user = User(name=name, role=role)
            db.session.add(user)
        users.append(user)
    db.session.commit()
    taxonomies = db.session.scalars(select(Taxonomy).order_by(Taxonomy.slug)).all()
    start = storage.FILL_START + timedelta(seconds=first)
    done = 0
    with current_app.test_request_context():
        ids = db.session.scalars(
            select(Prediction.id)
            .where(Prediction.created_at >= start, Prediction.created_at < start + timedelta(seconds=n))
            .order_by(Prediction.id)
        ).all()
        for k, prediction_id in enumerate(ids[step // 2 :: step]):
            prediction = db.session.get(Prediction, prediction_id)
            parts = []
            for result in rng.sample(prediction.results, rng.choice([1, len(prediction.results)])):
                taxonomy = next(t for t in taxonomies if t.id == result.taxonomy_id)
                roll = rng.random()
                if roll < 0.5:
                    parts.append(ReviewPart(taxonomy, "accept"))
                elif roll < 0.85:
                    labels = list(result.labels)
                    if len(labels) > 1 and rng.random() < 0.5:
                        labels.remove(rng.choice(labels))
                    else:
                        labels.append(rng.choice([x for x in result.scores if x not in labels]))
                    parts.append(ReviewPart(taxonomy, "correct", labels=labels))
                else:
                    parts.append(ReviewPart(taxonomy, "skip"))
            ReviewCommand(prediction, users[k % 2], parts).run(commit=False)
            done += 1
            if done % 200 == 0:
                db.session.commit()
                db.session.expunge_all()
                users = [db.session.merge(u) for u in users]
                taxonomies = [db.session.merge(t) for t in taxonomies]
        db.session.commit()
    return done


# --- HTTP --------------------------------------------------------------------------------------------------------


class Client:
    """One client: a fresh connection per request (the kernel spreads them over the workers), the session
    cookie of a signed-in admin, the API token."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token, self.cookies = port, token, SimpleCookie()

    def open(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        sent = {"Connection": "close", **(headers or {})}
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={m.value}" for k, m in self.cookies.items())
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        for header in response.msg.get_all("Set-Cookie") or []:
            self.cookies.load(header)
        return conn, response

    def call(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, float]:
        started = time.perf_counter()
        conn, response = self.open(method, path, body, headers)
        try:
            payload = response.read()
        finally:
            conn.close()
        return response.status, payload, time.perf_counter() - started

    def get(self, path: str) -> float:
        status, payload, seconds = self.call(
            "GET", path, headers={"Authorization": f"Bearer {self.token}"} if path.startswith("/api/") else None
        )
        if status != 200:
            raise SystemExit(f"GET {path} answered {status}: {payload[:500]!r}")
        return seconds

    def csrf(self, path: str) -> str:
        status, page, _ = self.call("GET", path)
        match = re.search(rb'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', page)
        if status != 200 or match is None:
            raise SystemExit(f"GET {path} answered {status} without a CSRF token")
        return match.group(1).decode()

    def sign_in(self) -> None:
        form = urlencode({"name": ADMIN, "password": PASSWORD, "csrf_token": self.csrf("/login")}).encode()
        status, _, _ = self.call("POST", "/login", form, {"Content-Type": "application/x-www-form-urlencoded"})
        if status != 302:
            raise SystemExit(f"signing in answered {status}")

    def predict(self, abstracts: list[dict]) -> float:
        body = json.dumps({"abstracts": abstracts}).encode()
        status, payload, seconds = self.call("POST", "/api/v1/predict", body, {"Content-Type": "application/json"})
        if status != 200 or len(json.loads(payload)["predictions"]) != len(abstracts):
            raise SystemExit(f"predict answered {status}: {payload[:500]!r}")
        return seconds

    def export_rate(self, fmt: str, limit: int) -> dict[str, float]:
        """Rows/s of the predictions export over its first ``limit`` rows (all of them if fewer), and the seconds to
        the first row."""
        started = time.perf_counter()
        conn, response = self.open(
            "GET", f"/api/v1/predictions.{fmt}", headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            if response.status != 200:
                raise SystemExit(f"export .{fmt} answered {response.status}")
            stream = io.TextIOWrapper(response, encoding="utf-8", newline="")
            rows: Iterator[Any] = csv.reader(stream) if fmt == "csv" else iter(stream)
            if fmt == "csv":
                next(rows)  # the header
            first, count = None, 0
            for _ in rows:
                count += 1
                first = first or time.perf_counter() - started
                if count == limit:
                    break
            seconds = time.perf_counter() - started
        finally:
            conn.close()
        return {"rows": count, "rows_per_s": round(count / seconds), "first_row_ms": round((first or 0) * 1000, 1)}

    def upload(self, name: str, content: str) -> int:
        """POST a CSV file to /batches; the job's id."""
        token = self.csrf("/batches")
        boundary = uuid.uuid4().hex
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\n{token}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: text/csv\r\n\r\n{content}\r\n--{boundary}--\r\n"
        ).encode()
        conn, response = self.open(
            "POST", "/batches", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        try:
            response.read()
            location = response.getheader("Location") or ""
        finally:
            conn.close()
        match = re.search(r"/batches/(\d+)", location)
        if response.status != 302 or match is None:
            raise SystemExit(f"uploading {name} answered {response.status}")
        return int(match.group(1))


class Requests:
    """The page requests timed, each drawn at random from realistic ones."""

    def __init__(self, corpus: Corpus, slugs: list[str], ids: list[int], top: str, seed: int = 5) -> None:
        self.corpus, self.slugs, self.ids, self.top = corpus, slugs, ids, top
        self.rng = random.Random(seed)
        self.count = 0

    def path(self, figure: str) -> str:
        rng = self.rng
        if figure == "history page":
            return f"/history?page={rng.randint(1, 5)}"
        if figure == "label filter":
            return "/history?" + urlencode({"label": rng.choice(self.corpus.labels)})
        if figure == TOP_LABEL:
            return "/history?" + urlencode({"label": self.top})
        if figure == "full-text search":
            return "/history?" + urlencode({"q": rng.choice(self.corpus.searches)})
        if figure == "review queue":
            return "/curate/queue?" + urlencode({"taxonomy": rng.choice(["", *self.slugs])})
        if figure == "similar papers":
            return f"/api/v1/predictions/{rng.choice(self.ids)}/similar"
        raise ValueError(figure)

    def abstracts(self) -> list[dict]:
        self.count += 1
        texts = self.corpus.texts
        return [
            {"title": f"Scale bench {self.count}.{i}", "abstract": texts[self.rng.randrange(len(texts))]["abstract"]}
            for i in range(64)
        ]

    def timed(self, client: Client, figure: str) -> float:
        return client.predict(self.abstracts()) if figure == "predict 64" else client.get(self.path(figure))


# --- measuring one size --------------------------------------------------------------------------------------------


def measure_served(site: Site, corpus: Corpus, args: argparse.Namespace, with_similar: bool) -> dict[str, Any]:
    """p50/p95 of every figure against gunicorn on the site, export throughput and worker RSS."""
    figures = [f for f in FIGURES if with_similar or f != "similar papers"]
    times: dict[str, list[float]] = {f: [] for f in figures}
    cold: dict[str, list[float]] = {f: [] for f in figures}
    requests = site.requests(corpus)
    with gunicorn(site.env, site.data_dir / "gunicorn.log") as master:
        client = Client(int(site.env["PORT"]), site.token)
        client.sign_in()
        for figure in figures:
            for _ in range(COLD_CALLS if figure in PAGE_FIGURES or figure == "similar papers" else 1):
                cold[figure].append(requests.timed(client, figure))
        # Every round times each figure once, except the slow ones: --predict-calls predicts, a quarter as many
        # top-label filters.
        every = dict.fromkeys(figures, 1) | {
            "predict 64": max(1, args.requests // max(1, args.predict_calls)),
            TOP_LABEL: 4,
        }
        for r in range(args.requests):
            for figure in figures[r % len(figures) :] + figures[: r % len(figures)]:
                if r % every[figure] == 0:
                    times[figure].append(requests.timed(client, figure))
        export = {fmt: client.export_rate(fmt, args.export_rows) for fmt in ("csv", "jsonl")}
        rss = [round((rss_bytes(pid) or 0) / 2**20) for pid in sorted(worker_pids(master.pid))]
    return {
        "figures": {
            f: {
                "p50_ms": ms(times[f], 50),
                "p95_ms": ms(times[f], 95),
                "calls": len(times[f]),
                "cold_max_ms": ms(cold[f], 100),
            }
            for f in figures
        },
        "export": export,
        "worker_rss_mb": rss,
    }


def run_database(
    dialect: str, corpus: Corpus, args: argparse.Namespace, postgres: str, work: Path
) -> list[dict[str, Any]]:
    site = Site(dialect, postgres, work)
    blocks = []
    try:
        for n in args.sizes:
            started_load = load()
            print(
                f"\n== {dialect}, N = {n:,} predictions x {len(corpus.bundles)} taxonomies (load {started_load}) ==",
                flush=True,
            )
            block: dict[str, Any] = {"database": dialect, "n": n, "load_start": started_load}
            block |= site.grow(corpus, n, args)
            report_fill(f"[{dialect} N={n:,}]", block)
            with_similar = not args.similar_up_to or n <= args.similar_up_to
            block |= measure_served(site, corpus, args, with_similar)
            block["load_end"] = load()
            report_block(block)
            blocks.append(block)
    finally:
        site.close()
    return blocks


def report_fill(tag: str, block: dict[str, Any]) -> None:
    written = f"{block['written']:,} written in {block['fill_s']} s ({block['fill_per_s'] or 0:,}/s)"
    copied = f", {block['copied']:,} copied in SQL in {block['copy_s']} s" if block["copied"] else ""
    print(
        f"{tag} {written}{copied}, vector index {block['index_s']} s, {block['reviews']:,} reviewed in "
        f"{block['review_s']} s; the database grew "
        f"{block['bytes'] / 2**20:,.0f} MiB: {block['bytes_per_result']:,} bytes per stored (prediction, taxonomy), "
        "indexes included",
        flush=True,
    )


def report_block(block: dict[str, Any]) -> None:
    tag = f"[{block['database']} N={block['n']:,}]"
    for name, f in block["figures"].items():
        print(
            f"{tag} {name:16s} p50 {f['p50_ms']:8.1f} ms  p95 {f['p95_ms']:8.1f} ms  ({f['calls']} calls; "
            f"cold: first calls up to {f['cold_max_ms']:.0f} ms)"
        )
    if "similar papers" not in block["figures"]:
        print(f"{tag} similar papers    not measured (N over --similar-up-to)")
    for fmt, e in block["export"].items():
        print(
            f"{tag} export .{fmt:5s} {e['rows_per_s']:8,} rows/s over {e['rows']:,} rows "
            f"(first row {e['first_row_ms']:.0f} ms)"
        )
    print(f"{tag} web worker RSS after: {', '.join(f'{v} MiB' for v in block['worker_rss_mb'])}")
    print(f"{tag} load average {block['load_start']} -> {block['load_end']}", flush=True)


# --- the job engine: one worker process, then two --------------------------------------------------------------


@contextlib.contextmanager
def redis_server(root: Path) -> Iterator[str]:
    env = {**os.environ, "PAPERTAG_REDIS_ROOT": str(root)}
    script = str(REPO / "tests" / "services" / "redis.sh")
    url = subprocess.run(["sh", script, "start"], env=env, check=True, capture_output=True, text=True).stdout.split()[
        -1
    ]
    try:
        yield url
    finally:
        subprocess.run(["sh", script, "stop"], env=env, check=False)


@contextlib.contextmanager
def job_workers(site: Site, count: int) -> Iterator[list[subprocess.Popen]]:
    """``count`` ``flask jobs worker`` processes, as ``make run`` starts one; SIGTERM after."""
    procs = []
    for k in range(count):
        log = open(site.data_dir / f"worker-{count}-{k}.log", "wb")  # noqa: SIM115 - the child holds it
        procs.append(
            subprocess.Popen(
                [str(BIN / "flask"), "--app", "wsgi", "jobs", "worker"], cwd=REPO, env=site.env, stdout=log, stderr=log
            )
        )
        log.close()
    try:
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def probe(
    client: Client,
    requests: Requests,
    interval: float,
    stop: threading.Event,
    out: list[tuple[float, float]],
    most: int,
) -> None:
    """Page requests, one started every ``interval`` seconds (or as soon as the last one answered), until ``stop`` or
    ``most`` of them: (finished at, seconds). Paced like a person browsing, so the probe does not take a core itself."""
    k = 0
    while not stop.is_set() and k < most:
        seconds = client.get(requests.path(PAGE_FIGURES[k % len(PAGE_FIGURES)]))
        out.append((time.perf_counter(), seconds))
        k += 1
        stop.wait(max(0.0, interval - seconds))


def batch_files(corpus: Corpus, rows: int, per_file: int, tag: str) -> list[tuple[str, str]]:
    files = []
    texts = corpus.texts
    for first in range(0, rows, per_file):
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["title", "abstract"])
        for i in range(first, min(rows, first + per_file)):
            paper = texts[(i * 31) % len(texts)]
            writer.writerow([f"{tag} {i}: {paper.get('title') or ''}", paper["abstract"]])
        files.append((f"{tag}-{first // per_file}.csv", out.getvalue()))
    return files


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process on the machine now: pid -> (name, CPU seconds it has used, user and system)."""
    seen = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        times, cmdline = proc.info["cpu_times"], proc.info["cmdline"] or []
        if times is not None:
            name = "gunicorn" if any("gunicorn" in part for part in cmdline[:2]) else proc.info["name"]
            seen[proc.pid] = (name, times.user + times.system)
    return seen


def cpu_by_role(before: dict[int, tuple[str, float]], workers: set[int]) -> dict[str, float]:
    """CPU seconds used since ``before``, by role: the job workers (``workers``), the database server, the queue,
    the web server, this bench and every other process (another user's load on a shared machine)."""
    roles = {"postgres": "database", "redis-server": "queue", "gunicorn": "web"}
    used: dict[str, float] = {}
    for pid, (name, seconds) in cpu_seconds().items():
        role = "job workers" if pid in workers else "bench" if pid == os.getpid() else roles.get(name, "other")
        used[role] = used.get(role, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
    return used


def run_batch(
    site: Site, client: Client, corpus: Corpus, args: argparse.Namespace, workers: int, paged: bool
) -> dict[str, Any]:
    """Upload ``--batch-rows`` abstracts, let ``workers`` processes tag them; the steady rate and the CPU each role
    used per abstract, and with ``paged`` the web's p50/p95 while a person browses beside the batch (their pages take
    CPU from the workers, so the engine's own scaling is measured in a run without them)."""
    started_load = load()
    engine = create_engine(database_uri(site.url, site.data_dir))
    requests = site.requests(corpus, seed=workers)
    tag = f"w{workers}{'-paged' if paged else ''}"
    with job_workers(site, workers) as procs:
        cpu_before = cpu_seconds()
        job_ids = [
            client.upload(name, body) for name, body in batch_files(corpus, args.batch_rows, args.batch_file_rows, tag)
        ]
        started = time.perf_counter()
        stop, probed = threading.Event(), []
        thread = threading.Thread(
            target=probe, args=(client, requests, args.probe_interval, stop, probed, 10**9 if paged else 0)
        )
        thread.start()
        progress: list[tuple[float, int]] = []
        try:
            while True:
                with engine.connect() as conn:
                    rows = conn.execute(
                        select(BatchJob.processed, BatchJob.status).where(BatchJob.id.in_(job_ids))
                    ).all()
                progress.append((time.perf_counter(), sum(r.processed for r in rows)))
                failed = [r for r in rows if r.status == "failed"]
                if failed:
                    raise SystemExit(f"a batch job failed; see {site.data_dir}/worker-*.log")
                if all(r.status == "finished" for r in rows):
                    break
                time.sleep(BATCH_POLL)
            cpu = cpu_by_role(cpu_before, {p.pid for p in procs})
        finally:
            stop.set()
            thread.join()
            engine.dispose()
    total = args.batch_rows

    def reached(share: float) -> float:
        """When the share of rows done was reached (linear between polls)."""
        goal = share * total
        for (t0, p0), (t1, p1) in zip(progress, progress[1:], strict=False):
            if p1 >= goal:
                return t0 + (t1 - t0) * ((goal - p0) / (p1 - p0) if p1 > p0 else 1.0)
        return progress[-1][0]

    t10, t90 = reached(0.1), reached(0.9)
    during = [seconds for at, seconds in probed if t10 <= at <= t90] or [s for _, s in probed]
    run: dict[str, Any] = {
        "workers": workers,
        "paged": paged,
        "rows": total,
        "files": len(job_ids),
        "wall_s": round(progress[-1][0] - started, 1),
        "steady_per_s": round(0.8 * total / (t90 - t10), 1),
        "cpu_ms_per_abstract": {role: round(1000 * seconds / total, 2) for role, seconds in sorted(cpu.items())},
        "load_start": started_load,
        "load_end": load(),
    }
    if paged:
        run |= {"web_p50_ms": ms(during, 50), "web_p95_ms": ms(during, 95), "web_calls": len(during)}
    return run


def run_batches(corpus: Corpus, args: argparse.Namespace, postgres: str, work: Path) -> dict[str, Any]:
    started_load = load()
    with redis_server(Path(args.redis_root)) as redis_url:
        site = Site(args.batch_database, postgres, work, REDIS_URL=redis_url)
        try:
            history = min(args.sizes)
            print(
                f"\n== job engine on Redis, {args.batch_database} with {history:,} predictions "
                f"(load {started_load}) ==",
                flush=True,
            )
            site.grow(corpus, history, args)
            with gunicorn(site.env, site.data_dir / "gunicorn.log"):
                client = Client(int(site.env["PORT"]), site.token)
                client.sign_in()
                requests = site.requests(corpus, seed=0)
                for figure in PAGE_FIGURES:  # warm every worker's caches
                    for _ in range(COLD_CALLS):
                        client.get(requests.path(figure))
                idle_load = load()
                probed: list[tuple[float, float]] = []
                probe(client, requests, args.probe_interval, threading.Event(), probed, 4 * args.requests)
                idle = [seconds for _, seconds in probed]
                out: dict[str, Any] = {
                    "database": args.batch_database,
                    "history": history,
                    "idle": {
                        "web_p50_ms": ms(idle, 50),
                        "web_p95_ms": ms(idle, 95),
                        "calls": len(idle),
                        "load_start": idle_load,
                        "load_end": load(),
                    },
                }
                tag = f"[job engine, {args.batch_database}, Redis]"
                print(
                    f"{tag} web pages idle: p50 {out['idle']['web_p50_ms']} ms, p95 {out['idle']['web_p95_ms']} ms "
                    f"(load {idle_load} -> {load()})",
                    flush=True,
                )
                runs = []
                for paged in BATCH_RUNS[args.batch_runs]:
                    for workers in (1, 2):
                        run = run_batch(site, client, corpus, args, workers, paged)
                        runs.append(run)
                        pages = (
                            f"web pages meanwhile p50 {run['web_p50_ms']} ms, p95 {run['web_p95_ms']} ms "
                            f"({run['web_p95_ms'] / out['idle']['web_p95_ms']:.2f}x idle)"
                            if paged
                            else "no page requests"
                        )
                        print(
                            f"{tag} {workers} worker process(es): {run['rows']:,} abstracts in {run['files']} files, "
                            f"{run['wall_s']} s wall, steady {run['steady_per_s']} abstracts/s; {pages} "
                            f"(load {run['load_start']} -> {run['load_end']})",
                            flush=True,
                        )
                        shares = ", ".join(f"{role} {v}" for role, v in run["cpu_ms_per_abstract"].items())
                        print(f"{tag} CPU ms per abstract, whole run: {shares}", flush=True)
                out["runs"] = runs
                speedups = []
                pairs = zip(runs[::2], runs[1::2], strict=True)
                for paged, (one, two) in zip(BATCH_RUNS[args.batch_runs], pairs, strict=True):
                    key = "speedup_paged" if paged else "speedup"
                    out[key] = round(two["steady_per_s"] / one["steady_per_s"], 2)
                    beside = f"with a page every {args.probe_interval} s" if paged else "with the batch alone"
                    speedups.append(f"{out[key]:.2f}x {beside}")
                print(f"{tag} speed-up, two worker processes / one: {', '.join(speedups)} (same run)")
        finally:
            site.close()
    return out


def postgres_url(given: str) -> str:
    """``given``, else the test setup's throwaway server (started if it is not running; left running)."""
    if given:
        return given
    done = subprocess.run(
        ["sh", str(REPO / "tests" / "services" / "postgres.sh"), "start"], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"tests/services/postgres.sh start failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def sizes(raw: str) -> list[int]:
    values = sorted({int(v.replace("_", "")) for v in raw.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("sizes are whole numbers from 1 up, e.g. 10000,100000")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=sizes, default=sizes("10000,100000,1000000"), help="history sizes, grown in turn"
    )
    parser.add_argument("--databases", default="sqlite,postgresql", help="sqlite, postgresql or both")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("TEST_DATABASE_URL", ""),
        help="a PostgreSQL server URL (default: tests/services/postgres.sh's)",
    )
    parser.add_argument("--texts", type=int, default=20000, help="real abstracts whose texts are recycled")
    parser.add_argument("--scored", type=int, default=400, help="real abstracts the shipped models answer")
    parser.add_argument(
        "--written", type=int, default=100000, help="predictions written by the app's storage code; copies beyond"
    )
    parser.add_argument("--reviewed", type=float, default=0.01, help="share of predictions reviewed")
    parser.add_argument("--requests", type=int, default=40, help="timed calls per page figure and size")
    parser.add_argument("--predict-calls", type=int, default=8, help="timed 64-abstract predict calls per size")
    parser.add_argument("--export-rows", type=int, default=20000, help="export rows timed")
    parser.add_argument("--similar-up-to", type=int, default=0, help="skip similar papers above this N (0: never)")
    parser.add_argument("--batch-rows", type=int, default=100000, help="abstracts the batch tags")
    parser.add_argument(
        "--batch-file-rows", type=int, default=5000, help="rows per uploaded CSV (BATCH_MAX_ROWS at most)"
    )
    parser.add_argument("--batch-database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--batch-runs",
        choices=tuple(BATCH_RUNS),
        default="both",
        help="time the batch alone, with pages beside it, or both (each: one worker, then two)",
    )
    parser.add_argument(
        "--probe-interval", type=float, default=0.5, help="seconds between the page requests timed around the batch"
    )
    parser.add_argument(
        "--redis-root",
        default=str(Path(tempfile.gettempdir()) / "papertag-redis-scale"),
        help="the batch's own Redis server's folder",
    )
    parser.add_argument("--skip-batch", action="store_true")
    parser.add_argument("--work-dir", default=tempfile.gettempdir(), help="where the sites' DATA_DIRs go")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    if not set(databases) <= {"sqlite", "postgresql"}:
        parser.error("--databases takes sqlite, postgresql or both")
    command = shlex.join(["python", "bench/scale.py", *sys.argv[1:]])
    print(
        f"command: {command}\nmachine: {len(os.sched_getaffinity(0))} cores; load average at start {load()}", flush=True
    )
    needs_postgres = "postgresql" in databases or (not args.skip_batch and args.batch_database == "postgresql")
    postgres = postgres_url(args.postgres) if needs_postgres else ""
    work = Path(args.work_dir)
    corpus = Corpus.build(args.texts, args.scored)
    results: dict[str, Any] = {"command": command, "load_start": load(), "blocks": []}
    for dialect in databases:
        results["blocks"] += run_database(dialect, corpus, args, postgres, work)
    if not args.skip_batch:
        results["batch"] = run_batches(corpus, args, postgres, work)
    results["load_end"] = load()
    print(f"\ncommand: {command}\nload average at end {results['load_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
