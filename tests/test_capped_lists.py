"""Lists that grow with the history (issue 13): the label filter, full-text search and the review queue count up
to LIST_COUNT_CAP and say "N+" beyond it, and a set filter with more matches than that is walked newest first (or
in margin order) with a test per item instead of being read whole. Whichever plan a list takes, it lists the
same items in the same order; only the count's wording and a broad search's ranked pool differ."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from tests.conftest import BundleFactory, signed_in
from webapp.extensions import db
from webapp.history import paging, search
from webapp.history.paging import STREAMING_PLAN, count_up_to, planned
from webapp.models import Prediction, PredictionResult, Taxonomy
from webapp.serving.registry import import_bundle

SLUG = "test-tasks"
PER_PAGE = 3


@pytest.fixture
def stored(app: Flask, client: FlaskClient, abstracts: list[dict]) -> list[int]:
    """Ids of 24 stored predictions, three pages of three in every list below at least."""
    app.config["HISTORY_PER_PAGE"] = PER_PAGE
    body = {"abstracts": [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts[:24]]}
    response = client.post("/api/v1/predict", json=body)
    assert response.status_code == 200
    return [p["id"] for p in response.get_json()["predictions"]]


def _labels(app: Flask) -> dict[int, list[str]]:
    with app.app_context():
        return dict(db.session.execute(select(PredictionResult.prediction_id, PredictionResult.labels)).all())


def _common_label(app: Flask) -> str:
    """The label the model gave most often short of every paper (a filter whose matches pass a small cap, with
    papers left out of it)."""
    labels = _labels(app)
    counts = Counter(label for assigned in labels.values() for label in assigned)
    return next(label for label, n in counts.most_common() if n < len(labels))


def _all_pages(client: FlaskClient, path: str, query: dict[str, str]) -> tuple[list[int], list[str]]:
    """Every page of a list, followed by its "next" links: the prediction ids in order, and each page's count."""
    ids, counts, page = [], [], 1
    while True:
        response = client.get(path, query_string={**query, "page": str(page)})
        assert response.status_code == 200, response.get_data(as_text=True)[:500]
        text = response.get_data(as_text=True)
        ids += [int(i) for i in re.findall(r'class="history-title" href="/(?:curate/)?predictions/(\d+)', text)]
        counts += re.findall(r'<p class="muted">([\d,+]+) (?:prediction|to review)', text)
        if 'rel="next"' not in text:
            return ids, counts
        page += 1
        assert page < 50, "the pages never end"


def _review(app: Flask, client: FlaskClient, pid: int, action: str, slug: str = SLUG, **form: object) -> None:
    data = {"based_on": "0", "labels": form.pop("labels", []), "add": [""], "note": "", "action": action, **form}
    response = client.post(f"/curate/predictions/{pid}/{slug}", data=data)
    assert response.status_code == 302, response.get_data(as_text=True)[:500]


def test_a_label_page_walks_the_date_index_when_its_rows_are_among_the_newest(
    app: Flask, stored: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``paging.among_newest``: on SQLite a page of a label whose matches fill it among the newest predictions
    tests predictions down the date index instead of looking every match up and sorting them all; looked up,
    the pages are the same."""
    curator = signed_in(app, "cora", "curator")
    labels, label = _labels(app), _common_label(app)
    walked, _ = _all_pages(curator, "/history", {"label": label})
    monkeypatch.setattr(paging, "STEPS_PER_LOOKUP", -1)  # every match looked up
    assert _all_pages(curator, "/history", {"label": label})[0] == walked
    assert sorted(walked) == sorted(pid for pid in stored if label in labels[pid])
    monkeypatch.undo()
    with app.test_request_context():
        having = [pid for pid in stored if label in labels[pid]]
        newest_first = (Prediction.created_at.desc(), Prediction.id.desc())
        page = select(Prediction.id).where(paging.among_newest(Prediction.id, having, PER_PAGE + 1))
        sql = (
            page.order_by(*newest_first).limit(PER_PAGE + 1).compile(db.engine, compile_kwargs={"literal_binds": True})
        )
        if db.engine.dialect.name != "sqlite":
            return
        plan = " ".join(row[3] for row in db.session.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
    assert "ix_predictions_created_at" in plan and "PRIMARY KEY" not in plan, plan


def test_the_queue_of_a_label_counts_the_results_carrying_it(app: Flask, stored: list[int]) -> None:
    """The queue's count of a label's waiting results reads their label rows, each tied to its own result."""
    curator = signed_in(app, "cora", "curator")
    labels, label = _labels(app), _common_label(app)
    having = [pid for pid in stored if label in labels[pid]]
    listed, counts = _all_pages(curator, "/curate/queue", {"label": label})
    assert sorted(listed) == sorted(having) and set(counts) == {str(len(having))}, (len(having), counts)


def test_every_plan_lists_the_same_items_in_the_same_order(app: Flask, stored: list[int]) -> None:
    curator = signed_in(app, "cora", "curator")
    labels, label = _labels(app), _common_label(app)
    having = [pid for pid in stored if label in labels[pid]]
    lacking = [pid for pid in stored if label not in labels[pid]]
    assert len(having) > 4 and lacking, "the fixture needs a frequent label and papers without it"
    # Corrections move papers in and out of the label filter; accepts take papers out of the queue; a skip sends
    # one to the back of this curator's queue.
    _review(app, curator, having[0], "save", labels=[x for x in labels[having[0]] if x != label] or [])
    _review(app, curator, lacking[0], "save", labels=labels[lacking[0]], add=[label, ""])
    _review(app, curator, having[1], "accept", labels=labels[having[1]])
    _review(app, curator, having[2], "skip")
    lists = [
        ("/history", {"label": label}),
        ("/history", {"label": label.upper().replace(" ", "-")}),  # case and separators do not count
        ("/history", {"taxonomy": SLUG}),
        ("/history", {"reviewed": "yes"}),
        ("/history", {"reviewed": "no"}),
        ("/history", {"label": label, "taxonomy": SLUG, "reviewed": "no"}),
        ("/curate/queue", {}),
        ("/curate/queue", {"taxonomy": SLUG}),
        ("/curate/queue", {"label": label}),
    ]
    for path, query in lists:
        app.config["LIST_COUNT_CAP"] = 10_000  # every set read whole, every count exact
        exact, exact_counts = _all_pages(curator, path, query)
        app.config["LIST_COUNT_CAP"] = 2  # sets walked item by item, counts capped
        walked, capped_counts = _all_pages(curator, path, query)
        assert walked == exact, (path, query)
        assert len(exact) > 2 and set(exact_counts) == {str(len(exact))}, (path, query, exact_counts)
        assert set(capped_counts) == {"2+"}, (path, query, capped_counts)
    # Two sets in one query, each read whole or each walked: each keeps its own ids (a label's, the reviewed ones).
    app.config["LIST_COUNT_CAP"] = 10_000
    both, _ = _all_pages(curator, "/history", {"label": label, "reviewed": "yes"})
    app.config["LIST_COUNT_CAP"] = 2
    assert both and both == _all_pages(curator, "/history", {"label": label, "reviewed": "yes"})[0]
    app.config["LIST_COUNT_CAP"] = 2
    labelled, _ = _all_pages(curator, "/history", {"label": label})
    assert lacking[0] in labelled and having[0] not in labelled  # the curator's labels, not the model's
    assert set(labelled) == {*having[1:], lacking[0]}
    queue, _ = _all_pages(curator, "/curate/queue", {})
    assert queue[-1] == having[2] and having[1] not in queue and len(queue) == len(stored) - 3


def test_the_review_filter_reads_the_chosen_taxonomy(
    app: Flask, make_bundle: BundleFactory, client: FlaskClient, abstracts: list[dict]
) -> None:
    """With a taxonomy chosen, "reviewed" is reviewed in that taxonomy: a paper accepted only in another one is
    "not reviewed" there, as the taxonomy's review queue says; with none chosen, reviewed in some taxonomy."""
    fields = "test-fields"
    with app.app_context():
        import_bundle(make_bundle(seed=3, slug=fields, name="Fields", labels=["Biology", "Physics"]), actor="tests")
    app.config["HISTORY_PER_PAGE"] = PER_PAGE
    body = {"abstracts": [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts[:8]]}
    ids = [p["id"] for p in client.post("/api/v1/predict", json=body).get_json()["predictions"]]
    with app.app_context():
        rows = db.session.execute(
            select(PredictionResult.prediction_id, Taxonomy.slug, PredictionResult.labels).join(Taxonomy)
        )
        labels = {(pid, slug): assigned for pid, slug, assigned in rows}
    curator = signed_in(app, "cora", "curator")
    for pid, slug in [(ids[0], fields), (ids[1], fields), (ids[2], SLUG), (ids[3], SLUG), (ids[3], fields)]:
        _review(app, curator, pid, "accept", slug, labels=labels[pid, slug])
    _review(app, curator, ids[4], "skip")  # a skip is no review
    in_tasks, in_fields, in_any = {ids[2], ids[3]}, {ids[0], ids[1], ids[3]}, set(ids[:4])
    expected = [
        ({"taxonomy": SLUG, "reviewed": "yes"}, in_tasks),
        ({"taxonomy": SLUG, "reviewed": "no"}, set(ids) - in_tasks),
        ({"taxonomy": fields, "reviewed": "yes"}, in_fields),
        ({"taxonomy": fields, "reviewed": "no"}, set(ids) - in_fields),
        ({"reviewed": "yes"}, in_any),
        ({"reviewed": "no"}, set(ids) - in_any),
    ]
    for query, wanted in expected:
        app.config["LIST_COUNT_CAP"] = 10_000  # the reviewed ids read whole
        exact, _ = _all_pages(curator, "/history", query)
        app.config["LIST_COUNT_CAP"] = 1  # tested prediction by prediction
        assert set(exact) == wanted and _all_pages(curator, "/history", query)[0] == exact, query
    queue, _ = _all_pages(curator, "/curate/queue", {"taxonomy": SLUG})
    assert set(queue) == set(ids) - in_tasks, "the history's not reviewed is the taxonomy's queue"


def test_a_capped_count_says_so_and_paging_goes_on_past_it(app: Flask, stored: list[int]) -> None:
    curator = signed_in(app, "cora", "curator")
    app.config["LIST_COUNT_CAP"] = 4
    page = curator.get("/curate/queue").get_data(as_text=True)
    assert "4+ to review" in page and "Page 1 of 2+" in page and 'rel="next"' in page
    # Past the counted pages the list still pages on, and its last page has no "next".
    last_page = (len(stored) + PER_PAGE - 1) // PER_PAGE
    last = curator.get("/curate/queue", query_string={"page": str(last_page)}).get_data(as_text=True)
    assert f"Page {last_page} of {last_page}+" in last and 'rel="next"' not in last
    history = curator.get("/history", query_string={"taxonomy": SLUG}).get_data(as_text=True)
    assert "4+ predictions" in history
    # The whole history counts exactly whatever the cap: it is one cheap count.
    assert f"{len(stored)} predictions" in curator.get("/history").get_data(as_text=True)
    app.config["LIST_COUNT_CAP"] = 10_000
    assert f"{len(stored)} to review" in curator.get("/curate/queue").get_data(as_text=True)


@pytest.mark.parametrize("path", ["/curate/queue", "/history"])
def test_a_page_past_the_end_of_a_capped_list_is_404(app: Flask, stored: list[int], path: str) -> None:
    """Its count stopped at the cap, so the last page is not known, but a page with nothing on it is past it."""
    curator = signed_in(app, "cora", "curator")
    app.config["LIST_COUNT_CAP"] = 4
    query = {"taxonomy": SLUG}
    last_page = (len(stored) + PER_PAGE - 1) // PER_PAGE
    assert curator.get(path, query_string={**query, "page": str(last_page)}).status_code == 200
    response = curator.get(path, query_string={**query, "page": str(last_page + 1)})
    text = response.get_data(as_text=True)
    assert response.status_code == 404 and f"there is no page {last_page + 1}; the list ends before it" in text


@pytest.mark.parametrize("q", ["method", '"we propose"'])
@pytest.mark.parametrize("walks", [(search.FIRST_WALK, search.WALK_AT_MOST), (1, 60), (1, 1)])
def test_a_search_matching_more_than_its_pool_ranks_its_newest_matches(
    app: Flask, stored: list[int], monkeypatch: pytest.MonkeyPatch, walks: tuple[int, int], q: str
) -> None:
    """The pool is the newest matches whichever way PostgreSQL finds them: in one walk down the newest rows, in
    several, or mostly in the older rows' bitmap (a phrase's walks go further). The pool is the list: its count
    stops there, and so do its pages."""
    monkeypatch.setattr(search, "FIRST_WALK", walks[0])
    monkeypatch.setattr(search, "WALK_AT_MOST", walks[1])
    monkeypatch.setattr(search, "WALK_PHRASE_AT_MOST", walks[1])
    client = app.test_client()
    everything, counts = _all_pages(client, "/history", {"q": q})
    assert len(everything) > 6 and counts[0] == str(len(everything))
    app.config["SEARCH_RANK_POOL"] = 5
    pooled, counts = _all_pages(client, "/history", {"q": q})
    assert set(pooled) == set(sorted(everything)[-5:])  # the newest five matches (ids grow with time here)
    assert pooled == [pid for pid in everything if pid in set(pooled)]  # in the same relevance order
    first = client.get("/history", query_string={"q": q}).get_data(as_text=True)
    assert "5+ predictions; the newest 5 of them are shown, most relevant first" in first
    assert f"Page 1 of {(5 + PER_PAGE - 1) // PER_PAGE}</span>" in first and counts == ["5+", "5+"]
    app.config["SEARCH_RANK_POOL"] = len(everything)  # every match in the pool: nothing said
    assert f"{len(everything)} predictions</p>" in client.get("/history", query_string={"q": q}).get_data(as_text=True)
    app.config["SEARCH_RANK_POOL"] = 1_000
    assert "the newest" not in client.get("/history", query_string={"q": q, "page": "1"}).get_data(as_text=True)


def test_a_remembered_count_is_forgotten_once_the_session_writes(app: Flask, stored: list[int]) -> None:
    with app.test_request_context():
        ids = select(PredictionResult.id)
        assert count_up_to(ids) == count_up_to(ids) == len(stored)  # the second is remembered
        first = db.session.scalars(select(PredictionResult).where(PredictionResult.prediction_id == stored[0])).one()
        db.session.delete(first)
        db.session.flush()
        assert count_up_to(ids) == len(stored) - 1
        db.session.rollback()
        assert count_up_to(ids) == len(stored)


def test_an_error_under_planner_settings_is_the_one_raised(app: Flask) -> None:
    """A failing statement inside ``planned`` raises its own error: a RESET in PostgreSQL's aborted transaction
    would have raised another and hidden it (and the 503 a lost database gets)."""
    with app.app_context():
        with pytest.raises(DBAPIError) as raised:
            with planned(STREAMING_PLAN):
                db.session.execute(text("SELECT * FROM no_such_table"))
        assert "no_such_table" in str(raised.value) and "aborted" not in str(raised.value)
        db.session.rollback()
