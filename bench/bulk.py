"""What a bulk action costs (issue 12 point 4): one bulk "add a label" over ``--size`` predictions (plan: each
prediction's review command validated; apply: run in one transaction), against the baseline of the same number of
single reviews through the same command, each committed on its own (what ``--size`` separate saves cost), measured
in the same run on the same SQLite database, on disjoint predictions. Also the /agreement report over those
predictions once a second curator has reviewed them.

    python bench/bulk.py [--size 2000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import flask_migrate  # noqa: E402
from sqlalchemy import select  # noqa: E402

from bench import label_filter  # noqa: E402  (its fill(): stored results of a tiny bundle)
from tests.tiny_bundle import LABELS  # noqa: E402
from webapp import bulk, create_app  # noqa: E402
from webapp.curation.agreement import taxonomy_agreement  # noqa: E402
from webapp.curation.corrections import ReviewCommand, ReviewPart, taxonomy_state  # noqa: E402
from webapp.extensions import db  # noqa: E402
from webapp.models import Prediction, Taxonomy, User  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000, help="predictions per side (at most BULK_MAX, 5000)")
    args = parser.parse_args()
    root = label_filter.ROOT
    app = create_app({"DATA_DIR": str(root / "data"), "SECRET_KEY": "bench-secret-long-enough-for-production"})
    with app.app_context():
        flask_migrate.upgrade()
    with app.test_request_context():
        label_filter.fill(2 * args.size, 0)
        curator = db.session.scalar(select(User))
        taxonomy = db.session.scalar(select(Taxonomy))
        ids = list(db.session.scalars(select(Prediction.id).order_by(Prediction.id)))
        label = LABELS[-1]
        start = time.perf_counter()
        planned = bulk.plan(curator, ids[: args.size], taxonomy, "add", label)
        changed = bulk.apply(planned)
        bulk_s = time.perf_counter() - start
        db.session.expire_all()  # the baseline reads its predictions from the database too
        start = time.perf_counter()
        singles = 0
        for prediction in db.session.scalars(select(Prediction).where(Prediction.id.in_(ids[args.size :]))):
            labels = taxonomy_state(prediction, taxonomy).labels
            if label not in labels:
                ReviewCommand(prediction, curator, [ReviewPart(taxonomy, "correct", labels=[*labels, label])]).run()
                singles += 1
        single_s = time.perf_counter() - start
        second = User(name="ben", role="curator")
        db.session.add(second)
        db.session.commit()
        bulk.apply(bulk.plan(second, ids[: args.size], taxonomy, "accept"))
        start = time.perf_counter()
        report = taxonomy_agreement(taxonomy)
        agreement_s = time.perf_counter() - start
    print(f"{args.size} predictions per side; {changed} changed in bulk, {singles} one by one")
    print(f"one by one (baseline): {single_s:7.2f} s  1.00x")
    print(f"bulk, one transaction: {bulk_s:7.2f} s  {bulk_s / single_s:.2f}x")
    print(f"/agreement report over {len(report.items)} doubly reviewed items: {agreement_s:.2f} s")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(label_filter.ROOT, ignore_errors=True)
