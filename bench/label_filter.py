"""What reading the *current* labels costs the history label filter (issue 12 point 2), against the model-only
filter of before measured in the same run on the same database:

- baseline: ``results_with_label`` (the model's labels, ``predicted_labels``), what the filter read before;
- now: ``results_labelled`` (``predicted_labels`` for results nobody corrected, the ``current_labels`` rows the
  review command keeps for corrected ones): one query either way;
- and, for scale, computing every corrected result's labels from its events at request time (what the filter would
  cost without the ``current_labels`` table).

And the review queue's page and count: before, "no event at all" (one exists clause); now, "no active accept or
correction" (an undo reverses one: a recursive query) with the curator's skips ordered last.

A SQLite database with ``--predictions`` stored results of a tiny bundle, ``--corrected`` of them corrected through
the review command. Best of ``--rounds`` so a busy machine skews every side alike.

    python bench/label_filter.py [--predictions 20000] [--corrected 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import flask_migrate  # noqa: E402
from sqlalchemy import Select, exists, func, select  # noqa: E402

from bench.timing import best  # noqa: E402
from tests.tiny_bundle import LABELS, build_bundle, build_tokenizer  # noqa: E402
from webapp import create_app  # noqa: E402
from webapp.curation.annotations import label_views, results_labelled, results_with_label  # noqa: E402
from webapp.curation.corrections import ReviewCommand, ReviewPart  # noqa: E402
from webapp.curation.curate import queue_query  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.models import AnnotationEvent, Prediction, PredictionResult, User  # noqa: E402
from webapp.serving.registry import import_bundle  # noqa: E402


def fill(n: int, corrected: int) -> None:
    """``n`` stored results (1-3 random labels each) and ``corrected`` of them corrected by one curator."""
    version = import_bundle(build_bundle(ROOT / "bundle", build_tokenizer(ROOT / "tok.json"), seed=1), actor="bench")
    version = version.version
    rng = random.Random(7)
    for i in range(n):
        text = f"paper {i}"
        prediction = Prediction(abstract=text, text_sha256=hashlib.sha256(text.encode()).hexdigest(), source="bench")
        labels = rng.sample(LABELS, rng.randint(1, 3))
        result = PredictionResult(
            prediction=prediction,
            taxonomy_id=version.taxonomy_id,
            model_version_id=version.id,
            scores={label: 0.9 if label in labels else 0.1 for label in LABELS},
            labels=labels,
            thresholds=dict.fromkeys(LABELS, 0.5),
            margin=rng.random(),
        )
        result.add_label_rows(prediction)
        db.session.add(prediction)
        db.session.add(result)
    curator = User(name="cora", role="curator")
    db.session.add(curator)
    db.session.commit()
    taxonomy = version.taxonomy
    for prediction in db.session.scalars(select(Prediction).order_by(Prediction.id).limit(corrected)):
        wanted = rng.sample(LABELS, rng.randint(1, 3))
        ReviewCommand(prediction, curator, [ReviewPart(taxonomy, "correct", labels=wanted, note="bench")]).run(
            commit=False
        )
    db.session.commit()


def from_events(label: str) -> list[int]:
    """Without the table: every corrected result's labels computed from its events."""
    corrected = select(AnnotationEvent.prediction_id).where(AnnotationEvent.kind == "correction")
    results = db.session.scalars(select(PredictionResult).where(PredictionResult.prediction_id.in_(corrected))).all()
    return [rid for rid, view in label_views(results).items() if label in view.labels]


def queue_page(stmt: Select) -> int:
    """The first page of the queue and its count, what /curate/queue runs."""
    db.session.scalars(stmt.limit(25)).all()
    return db.session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=int, default=20_000)
    parser.add_argument("--corrected", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    app = create_app(
        {"DATA_DIR": str(ROOT / "data"), "SECRET_KEY": "bench-secret-long-enough-for-production", "TESTING": True}
    )
    with app.app_context():
        flask_migrate.upgrade()
    with app.test_request_context():
        fill(args.predictions, args.corrected)
        label = LABELS[0]
        count = func.count()
        before = best(
            args.rounds, lambda: db.session.scalar(select(count).select_from(results_with_label(label).subquery()))
        )
        now = best(
            args.rounds, lambda: db.session.scalar(select(count).select_from(results_labelled(label).subquery()))
        )
        python = best(args.rounds, lambda: from_events(label))
        found = db.session.scalar(select(count).select_from(results_labelled(label).subquery()))
        any_event = exists().where(
            AnnotationEvent.prediction_id == PredictionResult.prediction_id,
            AnnotationEvent.taxonomy_id == PredictionResult.taxonomy_id,
        )
        old_queue = select(PredictionResult).where(~any_event).order_by(PredictionResult.margin, PredictionResult.id)
        curator = db.session.scalar(select(User.id))
        queue_before = best(args.rounds, lambda: queue_page(old_queue))
        queue_now = best(args.rounds, lambda: queue_page(queue_query("", "", curator)))
    print(f"{args.predictions} results, {args.corrected} corrected; {found} carry {label!r} now")
    print(f"model labels only (before): {before * 1000:8.1f} ms  1.00x")
    print(f"current labels (now):       {now * 1000:8.1f} ms  {now / before:.2f}x")
    print(f"corrected ones from events: {python * 1000:8.1f} ms  {python / before:.2f}x (without the table)")
    print(f"queue page, any event (before): {queue_before * 1000:8.1f} ms  1.00x")
    print(f"queue page, active reviews (now): {queue_now * 1000:6.1f} ms  {queue_now / queue_before:.2f}x")


ROOT = Path(tempfile.mkdtemp(prefix="papertag-bench-"))

if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)
