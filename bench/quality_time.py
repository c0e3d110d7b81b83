"""Live quality and thresholds that learn at scale: how long the quality page, its JSON, its two SVG charts and
one "learn thresholds" take with many reviewed predictions.

Builds a temporary DATA_DIR (migrated SQLite, or --database-url), imports a bundle (default: the first under
models/, the shipped 194-label model), then stores --reviews reviewed predictions of it, each with a score for
every label, the labels over the version's thresholds and one correction event dated in the last 90 days.
Scores and corrections are synthetic (random, seeded), so no model runs: what is timed is the reading and
counting (quality) and the tuning, cross-fit, bundle rewrite and import with its load-and-smoke-test (learn).

    python bench/quality_time.py [--bundle models/research-tasks] [--reviews 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import flask_migrate  # noqa: E402

from webapp import create_app  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER  # noqa: E402
from webapp.models import AnnotationEvent, Prediction, PredictionResult, User, utcnow  # noqa: E402
from webapp.serving.registry import EXTENSION_KEY as LIVE_MODELS  # noqa: E402
from webapp.serving.registry import import_bundle  # noqa: E402


def store_reviews(version_id: str, taxonomy_id: int, labels: list[str], thresholds: list[float], n: int) -> None:
    """``n`` predictions with synthetic scores, each corrected once: a predicted label removed or one added."""
    rng = np.random.default_rng(0)
    user = User(name="bench", role="curator")
    db.session.add(user)
    now = utcnow()
    scores = rng.beta(0.3, 3.0, size=(n, len(labels)))
    cut = np.asarray(thresholds)
    for i in range(n):
        predicted = [labels[j] for j in np.flatnonzero(scores[i] >= cut)]
        prediction = Prediction(abstract=f"synthetic abstract {i}", text_sha256=f"{i:064x}", source="api")
        prediction.results.append(
            PredictionResult(
                taxonomy_id=taxonomy_id,
                model_version_id=version_id,
                scores={label: round(float(s), 6) for label, s in zip(labels, scores[i], strict=True)},
                labels=predicted,
                thresholds={label: float(t) for label, t in zip(labels, thresholds, strict=True)},
                margin=float(np.min(np.abs(scores[i] - cut))),
            )
        )
        near = labels[int(np.argsort(-scores[i])[len(predicted)])]  # a high-scoring label, usually not predicted
        removed = predicted[:1] if predicted and rng.random() < 0.4 else []
        added = [near] if rng.random() < 0.5 else []
        event = AnnotationEvent(
            prediction=prediction, taxonomy_id=taxonomy_id, user=user, added=added, removed=removed, note="bench"
        )
        event.created_at = now - timedelta(days=float(rng.uniform(0, 90)))
        db.session.add_all([prediction, event])
        if i % 500 == 499:
            db.session.commit()
    db.session.commit()


def timed(call: object, repeats: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()  # type: ignore[operator]
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(REPO / "models" / "research-tasks"))
    parser.add_argument("--reviews", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--database-url", default="", help="PostgreSQL URL (default: SQLite in a temporary dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="papertag-bench-quality-") as tmp:
        app = create_app(
            {"DATA_DIR": tmp, "SECRET_KEY": "bench", "DATABASE_URL": args.database_url, "RATELIMIT_ENABLED": False}
        )
        with app.app_context():
            flask_migrate.upgrade()
            version = import_bundle(args.bundle, actor="bench").version
            slug, labels = version.taxonomy.slug, list(version.labels)
            start = time.perf_counter()
            store_reviews(version.id, version.taxonomy_id, labels, list(version.thresholds), args.reviews)
            stored = time.perf_counter() - start
            print(f"stored {args.reviews} reviewed predictions x {len(labels)} labels in {stored:.1f} s")
        token = app.test_cli_runner().invoke(args=["tokens", "create", "bench-admin", "--role", "admin"])
        headers = {"Authorization": f"Bearer {token.output.strip().splitlines()[-1]}"}
        client = app.test_client()
        for name, path in (
            ("GET quality JSON", f"/api/v1/taxonomies/{slug}/quality"),
            ("GET quality page", f"/models/{slug}/quality"),
            ("GET timeline.svg", f"/models/{slug}/quality/timeline.svg"),
            ("GET labels.svg", f"/models/{slug}/quality/labels.svg"),
        ):
            seconds, response = timed(lambda path=path: client.get(path), args.repeats)
            print(f"{name:<18} {seconds * 1000:8.0f} ms (median of {args.repeats}), HTTP {response.status_code}")
        seconds, response = timed(lambda: client.post(f"/api/v1/taxonomies/{slug}/thresholds", headers=headers), 1)
        body = response.get_json()
        print(f"{'POST thresholds':<18} {seconds * 1000:8.0f} ms, HTTP {response.status_code}: ", end="")
        if response.status_code in (200, 201):
            held = body["held_out"]
            print(
                f"{len(body['changed'])} labels changed, held-out micro-F1 {held['trained_micro_f1']} -> "
                f"{held['learned_micro_f1']}, gate {'passed' if body['gate']['passed'] else 'not passed'}"
            )
        else:
            print(body.get("error"))
        app.extensions[LIVE_MODELS].stop()
        app.extensions[BATCH_WORKER].stop()


if __name__ == "__main__":
    main()
