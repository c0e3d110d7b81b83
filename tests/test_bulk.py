"""Issue 12 point 4: bulk accept / add / remove, from the history and the queue (a confirmation page first, no
JavaScript needed) and from ``POST /api/v1/annotations/bulk``; one review-command event per prediction that
changes, none for one that would not, all in one transaction."""

from __future__ import annotations

import json
import re

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import signed_in
from webapp.extensions import db
from webapp.models import AnnotationEvent, PredictionResult

SLUG = "test-tasks"


@pytest.fixture
def predicted(client: FlaskClient, abstracts: list[dict]) -> list[int]:
    body = {"abstracts": [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts[:8]]}
    response = client.post("/api/v1/predict", json=body)
    assert response.status_code == 200
    return [p["id"] for p in response.get_json()["predictions"]]


def _labels(app: Flask, pid: int) -> list[str]:
    with app.app_context():
        return sorted(
            db.session.scalars(select(PredictionResult.labels).where(PredictionResult.prediction_id == pid)).one()
        )


def _events(app: Flask) -> list[tuple[int, str, str, list[str], list[str]]]:
    with app.app_context():
        rows = db.session.scalars(select(AnnotationEvent).order_by(AnnotationEvent.id)).all()
        return [(e.prediction_id, e.kind, e.user.name, e.added, e.removed) for e in rows]


def _token(app: Flask, name: str, role: str) -> dict[str, str]:
    result = app.test_cli_runner().invoke(args=["tokens", "create", name, "--role", role])
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


def _current(client: FlaskClient, pid: int) -> list[str]:
    headers = _token(client.application, "reader", "curator")
    lines = client.get("/api/v1/annotations", headers=headers).get_data(as_text=True).splitlines()
    found = [json.loads(line) for line in lines if json.loads(line)["id"] == pid]
    return found[0]["labels"] if found else _labels(client.application, pid)


def test_add_from_ticked_rows_confirms_counts_and_records_one_event_per_change(
    app: Flask, curator_client: FlaskClient, predicted: list[int]
) -> None:
    label = "Code Generation"
    has = [pid for pid in predicted if label in _labels(app, pid)]
    lacks = [pid for pid in predicted if label not in _labels(app, pid)]
    chosen = lacks[:2] + has[:1]
    form = {"source": "history", "scope": "selected", "ids": [str(i) for i in chosen], "action": "add"}
    form |= {"taxonomy": SLUG, "label": label, "next": "/history?q=x"}
    page = curator_client.post("/curate/bulk", data=form)
    text = page.get_data(as_text=True)
    assert page.status_code == 200
    assert f'data-changed="{len(lacks[:2])}"' in text and f'data-unchanged="{len(has[:1])}"' in text
    assert "add “Code Generation” (" in text and _events(app) == []  # nothing recorded before the confirmation
    confirm = {"resolved_ids": ",".join(map(str, chosen)), "taxonomy": SLUG, "action": "add", "label": label}
    done = curator_client.post(
        "/curate/bulk", data=confirm | {"confirmed": str(len(lacks[:2])), "next": "/history?q=x"}
    )
    assert done.status_code == 302 and done.headers["Location"] == "/history?q=x"
    events = _events(app)
    assert sorted(pid for pid, *_ in events) == sorted(lacks[:2])
    assert all(kind == "correction" and who == "cora" and added == [label] for _, kind, who, added, _ in events)
    history = curator_client.get(f"/history?taxonomy={SLUG}&label={label}").get_data(as_text=True)
    for pid in chosen:
        assert f"#{pid}</span>" in history  # the history filter reads the current labels


def test_remove_for_everything_a_history_filter_matches(
    app: Flask, curator_client: FlaskClient, predicted: list[int]
) -> None:
    label = next(lab for pid in predicted for lab in _labels(app, pid))
    matching = [pid for pid in predicted if label in _labels(app, pid)]
    form = {"source": "history", "scope": "filter", "f_taxonomy": SLUG, "f_label": label, "action": "remove"}
    page = curator_client.post("/curate/bulk", data=form | {"taxonomy": SLUG, "label": label})
    assert f'data-changed="{len(matching)}"' in page.get_data(as_text=True)
    confirm = {"resolved_ids": ",".join(map(str, matching)), "taxonomy": SLUG, "action": "remove", "label": label}
    assert curator_client.post("/curate/bulk", data=confirm | {"confirmed": str(len(matching))}).status_code == 302
    assert sorted(
        pid for pid, kind, _, _, removed in _events(app) if kind == "correction" and removed == [label]
    ) == sorted(matching)
    assert f"#{matching[0]}</span>" not in curator_client.get(f"/history?taxonomy={SLUG}&label={label}").get_data(
        as_text=True
    )


def test_accept_a_queue_page_then_nothing_left_to_accept(
    app: Flask, curator_client: FlaskClient, predicted: list[int]
) -> None:
    queue = curator_client.get("/curate/queue").get_data(as_text=True)
    assert 'name="ids"' in queue and 'form="bulk-form"' in queue and "all 8 matching this filter" in queue
    form = {
        "source": "queue",
        "scope": "page",
        "page_ids": ",".join(map(str, predicted)),
        "action": "accept",
        "taxonomy": SLUG,
    }
    page = curator_client.post("/curate/bulk", data=form)
    assert 'data-changed="8"' in page.get_data(as_text=True)
    confirm = {"resolved_ids": ",".join(map(str, predicted)), "taxonomy": SLUG, "action": "accept", "confirmed": "8"}
    assert curator_client.post("/curate/bulk", data=confirm).status_code == 302
    assert [kind for _, kind, *_ in _events(app)] == ["accepted"] * 8
    assert "Nothing left to review" in curator_client.get("/curate/queue").get_data(as_text=True)
    again = curator_client.post("/curate/bulk", data=confirm)  # accepted already: no change, no new event
    assert 'data-changed="0"' in again.get_data(as_text=True) and len(_events(app)) == 8


def test_a_confirmation_whose_counts_changed_meanwhile_is_shown_again(
    app: Flask, curator_client: FlaskClient, predicted: list[int]
) -> None:
    confirm = {"resolved_ids": ",".join(map(str, predicted)), "taxonomy": SLUG, "action": "accept", "confirmed": "3"}
    page = curator_client.post("/curate/bulk", data=confirm)
    assert page.status_code == 200 and "data-bulk-stale" in page.get_data(as_text=True) and _events(app) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label": "Not A Label"}, "is not a label of"),
        ({"ids": ["999999"]}, "does not exist: 999999"),
        ({"ids": ["abc"]}, "whole numbers"),
        ({"ids": []}, "no prediction selected"),
        ({"taxonomy": "nope"}, "there is no taxonomy"),
        ({"taxonomy": ""}, "choose the taxonomy"),
        ({"action": "delete"}, "action must be one of accept, add, remove"),
        ({"scope": "everything"}, "scope must be one of"),
        ({"label": "a|b"}, "contains | or ;"),
        ({"action": "accept"}, "accept takes no label"),
        ({"scope": "filter", "source": "elsewhere"}, "source must be one of"),
        ({"scope": "filter", "source": "history", "f_reviewed": "maybe"}, "review filter"),
    ],
)
def test_bad_bulk_forms_get_a_message_and_change_nothing(
    app: Flask, curator_client: FlaskClient, predicted: list[int], change: dict, message: str
) -> None:
    form = {"source": "history", "scope": "selected", "ids": [str(predicted[0])], "action": "add", "taxonomy": SLUG}
    page = curator_client.post("/curate/bulk", data=form | {"label": "Code Generation"} | change)
    assert page.status_code == 400 and message in page.get_data(as_text=True)
    assert _events(app) == []


def test_bulk_max_bounds_a_selection_and_a_filter(
    app: Flask, curator_client: FlaskClient, predicted: list[int]
) -> None:
    app.config["BULK_MAX"] = 3
    form = {"source": "history", "action": "accept", "taxonomy": SLUG}
    page = curator_client.post("/curate/bulk", data=form | {"scope": "selected", "ids": [str(i) for i in predicted]})
    assert page.status_code == 400 and "at most 3 at once (BULK_MAX)" in page.get_data(as_text=True)
    page = curator_client.post("/curate/bulk", data=form | {"scope": "filter"})
    assert page.status_code == 400 and "4 predictions selected" in page.get_data(as_text=True)


def test_a_search_alone_takes_every_match_up_to_bulk_max(
    app: Flask, curator_client: FlaskClient, predicted: list[int]
) -> None:
    """A lone search is read from its newest matches, one past BULK_MAX at most (not ranked whole), and still takes
    every match when they fit."""
    listed = curator_client.get("/history", query_string={"q": "approach"}).get_data(as_text=True)
    matches = [int(i) for i in re.findall(r'class="history-title" href="/predictions/(\d+)', listed)]
    assert len(matches) >= 2
    form = {"source": "history", "scope": "filter", "f_q": "approach", "action": "accept", "taxonomy": SLUG}
    app.config["BULK_MAX"] = len(matches) - 1
    page = curator_client.post("/curate/bulk", data=form)
    assert page.status_code == 400 and f"{len(matches)} predictions selected" in page.get_data(as_text=True)
    app.config["BULK_MAX"] = len(matches)
    page = curator_client.post("/curate/bulk", data=form).get_data(as_text=True)
    assert f'data-changed="{len(matches)}"' in page
    resolved = re.search(r'name="resolved_ids" value="([\d,]+)"', page)
    assert resolved and sorted(map(int, resolved.group(1).split(","))) == sorted(matches)


def test_a_failure_part_way_records_nothing(
    app: Flask, curator_client: FlaskClient, predicted: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from webapp.curation import bulk

    calls = []
    original = bulk.ReviewCommand.run

    def failing(self, commit: bool = True):  # noqa: ANN001, ANN202 - test double
        calls.append(self.prediction.id)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return original(self, commit)

    monkeypatch.setattr(bulk.ReviewCommand, "run", failing)
    confirm = {"resolved_ids": ",".join(map(str, predicted)), "taxonomy": SLUG, "action": "accept", "confirmed": "8"}
    assert curator_client.post("/curate/bulk", data=confirm).status_code == 500  # the app's error page
    assert len(calls) == 3 and _events(app) == []  # two commands had run: rolled back with the third


def test_api_dry_run_counts_then_applies(app: Flask, client: FlaskClient, predicted: list[int]) -> None:
    headers = _token(app, "cora", "curator")
    label = "Code Generation"
    lacking = [pid for pid in predicted if label not in _labels(app, pid)]
    body = {"taxonomy": SLUG, "action": "add", "label": label, "ids": predicted}
    dry = client.post("/api/v1/annotations/bulk", json=body | {"dry_run": True}, headers=headers)
    assert dry.status_code == 200
    assert dry.get_json() | {"changed_ids": sorted(dry.get_json()["changed_ids"])} == {
        "taxonomy": SLUG,
        "action": "add",
        "label": label,
        "selected": 8,
        "changed": len(lacking),
        "unchanged": 8 - len(lacking),
        "dry_run": True,
        "changed_ids": sorted(lacking),
        "events": [],
    }
    assert _events(app) == []
    done = client.post("/api/v1/annotations/bulk", json=body, headers=headers)
    assert done.status_code == 201 and len(done.get_json()["events"]) == len(lacking) == len(_events(app))
    assert label in _current(client, lacking[0])


def test_a_label_is_read_whatever_its_case_and_separators(
    app: Flask, client: FlaskClient, predicted: list[int]
) -> None:
    """As in the history's filter: the label is recorded in the taxonomy's spelling; a queue filter matches alike."""
    headers = _token(app, "cora", "curator")
    label = "Semantic Segmentation"
    lacking = sorted(pid for pid in predicted if label not in _labels(app, pid))
    body = {"taxonomy": SLUG, "action": "add", "label": "semantic_segmentation", "ids": predicted}
    done = client.post("/api/v1/annotations/bulk", json=body, headers=headers)
    assert done.status_code == 201 and done.get_json()["label"] == label
    assert sorted(done.get_json()["changed_ids"]) == lacking
    assert [added for _, _, _, added, _ in _events(app)] == [[label]] * len(lacking)
    queue_filter = {"source": "queue", "f_taxonomy": SLUG, "f_label": "SEMANTIC-segmentation", "scope": "filter"}
    cora = signed_in(app, "cora2", "curator")
    form = queue_filter | {"taxonomy": SLUG, "action": "remove", "label": "semantic segmentation"}
    page = cora.post("/curate/bulk", data=form).get_data(as_text=True)
    assert f"remove “{label}” (Test tasks) from {len(predicted) - len(lacking)} prediction" in page


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"dry_run": "yes"}, '"dry_run" must be true or false'),
        ({"dry_run": 1}, '"dry_run" must be true or false'),
        ({"ids": "1,2"}, '"ids" must be a list'),
        ({"ids": [True]}, '"ids" must be a list'),
        ({"ids": [999999]}, "does not exist"),
        ({"label": "Nope"}, "is not a label of"),
        ({"label": 5}, "labels must be strings"),
        ({"action": "erase"}, "action must be one of"),
        ({"taxonomy": 3}, "choose the taxonomy"),
        ({"extra": 1}, "unknown fields: extra"),
    ],
)
def test_api_bad_input_is_a_400_naming_it(
    app: Flask, client: FlaskClient, predicted: list[int], body: dict, message: str
) -> None:
    headers = _token(app, "cora", "curator")
    full = {"taxonomy": SLUG, "action": "add", "label": "Code Generation", "ids": predicted[:2]} | body
    response = client.post("/api/v1/annotations/bulk", json=full, headers=headers)
    assert response.status_code == 400 and message in response.get_json()["error"], response.get_json()
    assert _events(app) == []


@pytest.mark.parametrize("role", ["curator", "adjudicator", "admin"])
def test_role_matrix_every_signed_in_role_may_bulk(app: Flask, predicted: list[int], role: str) -> None:
    user = signed_in(app, f"u-{role}", role)
    form = {"resolved_ids": str(predicted[0]), "taxonomy": SLUG, "action": "accept", "confirmed": "1"}
    assert user.post("/curate/bulk", data=form).status_code == 302
    headers = _token(app, f"t-{role}", role)
    body = {"taxonomy": SLUG, "action": "accept", "ids": [predicted[1]]}
    assert app.test_client().post("/api/v1/annotations/bulk", json=body, headers=headers).status_code == 201


def test_anonymous_callers_are_refused(app: Flask, client: FlaskClient, predicted: list[int]) -> None:
    form = {"resolved_ids": str(predicted[0]), "taxonomy": SLUG, "action": "accept", "confirmed": "1"}
    assert client.post("/curate/bulk", data=form).status_code == 302  # to the sign-in page
    body = {"taxonomy": SLUG, "action": "accept", "ids": [predicted[0]]}
    assert client.post("/api/v1/annotations/bulk", json=body).status_code == 401
    assert _events(app) == []


def test_labels_are_named_as_today_after_a_rename(app: Flask, client: FlaskClient, predicted: list[int]) -> None:
    """Label surgery: the old name of a renamed label is refused, the new one removes it from the items stored
    under the old name (their stored rows are not rewritten)."""
    admin = _token(app, "ada", "admin")
    old = next(lab for pid in predicted for lab in _labels(app, pid))
    having = [pid for pid in predicted if old in _labels(app, pid)]
    body = {"kind": "rename", "from": old, "to": "Renamed Task"}
    assert client.post(f"/api/v1/taxonomies/{SLUG}/label-changes", json=body, headers=admin).status_code == 201
    bulk = {"taxonomy": SLUG, "action": "remove", "ids": predicted, "dry_run": True}
    refused = client.post("/api/v1/annotations/bulk", json=bulk | {"label": old}, headers=admin)
    assert refused.status_code == 400 and "as it is named today" in refused.get_json()["error"]
    counted = client.post("/api/v1/annotations/bulk", json=bulk | {"label": "Renamed Task"}, headers=admin)
    assert sorted(counted.get_json()["changed_ids"]) == sorted(having)
