"""Issue 12 point 5: several curators per item (REVIEWS_NEEDED), Krippendorff's alpha per label and overall, the
disagreements with who said what, and the adjudicator's final label set, which the queue, the exports and the
trainer read."""

from __future__ import annotations

import json
import re

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import signed_in
from trainer.publish import paper_from_annotation
from webapp.extensions import db
from webapp.models import AnnotationEvent, User

SLUG = "test-tasks"
X, Y = "Code Generation", "Object Detection"
# Each curator's final label set per item (p1..p4): the hand-checked example below.
ANN = [{X, Y}, {X}, set(), set()]
BEN = [{X, Y}, set(), {Y}, set()]


@pytest.fixture
def predicted(client: FlaskClient, abstracts: list[dict]) -> list[int]:
    body = {"abstracts": [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts[:5]]}
    return [p["id"] for p in client.post("/api/v1/predict", json=body).get_json()["predictions"]]


def _token(app: Flask, name: str, role: str) -> dict[str, str]:
    result = app.test_cli_runner().invoke(args=["tokens", "create", name, "--role", role])
    assert result.exit_code == 0, result.output
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


def _review(client: FlaskClient, headers: dict[str, str], pid: int, labels: set[str]) -> None:
    """Leave the item with ``labels``: a correction, or an accept where they are the labels already."""
    response = client.post(
        f"/api/v1/predictions/{pid}/annotations", json={"taxonomy": SLUG, "labels": sorted(labels)}, headers=headers
    )
    if response.status_code == 400 and "nothing to save" in response.get_json()["error"]:
        response = client.post(
            f"/api/v1/predictions/{pid}/annotations", json={"taxonomy": SLUG, "action": "accept"}, headers=headers
        )
    assert response.status_code == 201, response.get_json()
    assert sorted(response.get_json()["labels"]) == sorted(labels)


def _queue_ids(client: FlaskClient) -> list[int]:
    page = client.get("/curate/queue").get_data(as_text=True)
    return [int(chunk.split(" ", 1)[0]) for chunk in page.split('<div class="meta">#')[1:]]


def _export(client: FlaskClient, headers: dict[str, str]) -> dict[int, dict]:
    lines = client.get(f"/api/v1/annotations?taxonomy={SLUG}", headers=headers).get_data(as_text=True).splitlines()
    return {record["id"]: record for record in map(json.loads, lines)}


@pytest.fixture
def two_reviews(app: Flask, client: FlaskClient, predicted: list[int]) -> dict[str, FlaskClient]:
    """ann and ben reviewed p1..p4 as ANN and BEN say, with REVIEWS_NEEDED = 2."""
    app.config["REVIEWS_NEEDED"] = 2
    people = {name: signed_in(app, name, "curator") for name in ("ann", "ben")}
    for name, sets in (("ann", ANN), ("ben", BEN)):
        headers = _token(app, name, "curator")
        for pid, labels in zip(predicted[:4], sets, strict=True):
            _review(client, headers, pid, labels)
    return people


def test_an_item_stays_queued_for_other_curators_until_enough_reviewed_it(
    app: Flask, client: FlaskClient, predicted: list[int]
) -> None:
    app.config["REVIEWS_NEEDED"] = 2
    ann, ben, cal = (signed_in(app, name, "curator") for name in ("ann", "ben", "cal"))
    _review(client, _token(app, "ann", "curator"), predicted[0], {X})
    assert predicted[0] not in _queue_ids(ann)  # a curator never sees an item twice once they reviewed it
    assert predicted[0] in _queue_ids(ben) and predicted[0] in _queue_ids(cal)
    _review(client, _token(app, "ben", "curator"), predicted[0], {X})
    assert predicted[0] not in _queue_ids(cal)  # two distinct curators: done
    app.config["REVIEWS_NEEDED"] = 1
    assert predicted[1] in _queue_ids(ann) and predicted[0] not in _queue_ids(cal)


def test_alpha_per_label_and_overall_on_a_hand_checked_example(
    app: Flask, two_reviews: dict[str, FlaskClient], predicted: list[int]
) -> None:
    """Two coders, four items. Label X: ann 1,1,0,0 and ben 1,0,0,0: 8 values, three 1s and five 0s; one unit
    (p2) disagrees, giving 2 mismatched ordered pairs, so D_o = 2/8 = 0.25 and D_e = 2*3*5/(8*7) = 30/56, alpha =
    1 - 0.25*56/30 = 0.5333. Label Y (ann 1,0,0,0; ben 1,0,1,0) is the same arithmetic: 0.5333. Overall, 16
    values over the 8 (item, label) units, six 1s, two disagreeing units: D_o = 4/16, D_e = 2*6*10/(16*15) = 0.5,
    alpha = 0.5. The fifth prediction has one review or none and is not counted."""
    page = two_reviews["ann"].get(f"/agreement?taxonomy={SLUG}")
    text = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "<strong data-overall-alpha>0.500</strong>" in text and "over 4 items" in text
    for label in (X, Y):
        row = text.split(f'<tr data-label="{label}">')[1].split("</tr>")[0]
        assert "<td data-alpha>0.533</td><td>3</td><td>1</td>" in row
    from webapp.curation.agreement import taxonomy_agreement
    from webapp.models import Taxonomy

    with app.test_request_context():
        report = taxonomy_agreement(db.session.scalar(select(Taxonomy).where(Taxonomy.slug == SLUG)))
        assert report.overall == pytest.approx(0.5)
        assert {row.label: round(row.alpha, 4) for row in report.labels} == {X: 0.5333, Y: 0.5333}
        assert [item.prediction.id for item in report.disagreements] == predicted[1:3]


def test_disagreements_list_who_said_what(two_reviews: dict[str, FlaskClient], predicted: list[int]) -> None:
    text = two_reviews["ben"].get("/agreement").get_data(as_text=True)
    listed = [int(chunk.split('"', 1)[0]) for chunk in text.split('data-prediction="')[1:]]
    assert listed == predicted[1:3]
    p2 = text.split(f'data-prediction="{predicted[1]}"')[1].split("</article>")[0]
    assert (
        f'data-reviewer="ann"><strong>ann</strong>: {X}' in p2
        and 'data-reviewer="ben"><strong>ben</strong>: no label' in p2
    )
    assert "<form" not in p2  # curators see the disagreements; only adjudicators resolve


def test_an_adjudication_is_the_final_label_set_for_queue_exports_and_trainer(
    app: Flask, client: FlaskClient, two_reviews: dict[str, FlaskClient], predicted: list[int]
) -> None:
    judge = signed_in(app, "jo", "adjudicator")
    p3 = predicted[2]
    page = judge.get("/agreement").get_data(as_text=True)
    assert f'action="/agreement/{SLUG}/{p3}"' in page
    response = judge.post(f"/agreement/{SLUG}/{p3}", data={"labels": [X], "add": [Y], "note": "both apply"})
    assert response.status_code == 302
    with app.app_context():
        event = db.session.scalars(select(AnnotationEvent).where(AnnotationEvent.kind == "adjudicated")).one()
        assert (event.prediction_id, event.user.name, event.added, event.note) == (p3, "jo", [X, Y], "both apply")
    headers = _token(app, "jo", "adjudicator")
    record = _export(client, headers)[p3]
    assert record["labels"] == [X, Y] and record["review"] == "adjudicated"
    assert paper_from_annotation(record).labels == [X, Y]  # what the trainer reads
    assert "Resolved by jo" in judge.get("/agreement").get_data(as_text=True)
    # The adjudicated item left every queue, also of a curator who never saw it (REVIEWS_NEEDED = 2).
    assert p3 not in _queue_ids(signed_in(app, "cal", "curator"))
    # Later events apply on top of the adjudicated labels.
    _review(client, _token(app, "cal", "curator"), p3, {X})
    assert _export(client, headers)[p3]["labels"] == [X]
    assert f"#{p3}</span>" in judge.get(f"/history?taxonomy={SLUG}&label={X}").get_data(as_text=True)


def test_role_matrix(
    app: Flask, client: FlaskClient, two_reviews: dict[str, FlaskClient], predicted: list[int]
) -> None:
    p2 = predicted[1]
    assert client.get("/agreement").status_code == 302  # anonymous: the sign-in page
    assert client.post(f"/agreement/{SLUG}/{p2}", data={"labels": [X]}).status_code == 302
    assert two_reviews["ann"].post(f"/agreement/{SLUG}/{p2}", data={"labels": [X]}).status_code == 403
    for role in ("adjudicator", "admin"):
        assert (
            signed_in(app, f"u-{role}", role).post(f"/agreement/{SLUG}/{p2}", data={"labels": [X]}).status_code == 302
        )
    # Through the annotations API the same rule holds: the review command checks the role.
    body = {"taxonomy": SLUG, "action": "adjudicate", "labels": [Y]}
    url = f"/api/v1/predictions/{p2}/annotations"
    assert client.post(url, json=body, headers=_token(app, "ann", "curator")).status_code == 403
    assert client.post(url, json=body, headers=_token(app, "u-adjudicator", "adjudicator")).status_code == 201
    # An adjudicator may do what a curator may: review, and bulk-accept.
    judge = signed_in(app, "jo", "adjudicator")
    assert judge.get("/curate/queue").status_code == 200
    assert (
        judge.post(
            "/curate/bulk",
            data={"resolved_ids": str(predicted[4]), "taxonomy": SLUG, "action": "accept", "confirmed": "1"},
        ).status_code
        == 302
    )
    assert judge.get("/curate/labels").status_code == 403  # but not what only admins may


@pytest.mark.parametrize(
    ("url", "form", "status", "message"),
    [
        ("/agreement/{slug}/{pid}", {"labels": ["Not A Label"]}, 400, "not labels of"),
        ("/agreement/{slug}/{pid}", {"labels": ["a;b"]}, 400, "contains | or ;"),
        ("/agreement/{slug}/{pid}", {"labels": [X], "note": "x" * 2001}, 400, "notes have at most 2000"),
        ("/agreement/{slug}/999999", {"labels": [X]}, 404, "there is no prediction 999999"),
        ("/agreement/nope/{pid}", {"labels": [X]}, 404, "there is no taxonomy"),
    ],
)
def test_bad_resolutions_are_refused_and_record_nothing(
    app: Flask,
    two_reviews: dict[str, FlaskClient],
    predicted: list[int],
    url: str,
    form: dict,
    status: int,
    message: str,
) -> None:
    judge = signed_in(app, "jo", "adjudicator")
    response = judge.post(url.format(slug=SLUG, pid=predicted[1]), data=form)
    assert response.status_code == status and message in response.get_data(as_text=True)
    with app.app_context():
        assert db.session.scalar(select(AnnotationEvent).where(AnnotationEvent.kind == "adjudicated")) is None


def test_a_refused_resolution_comes_back_as_it_was_sent_beside_its_reason(
    app: Flask, two_reviews: dict[str, FlaskClient], predicted: list[int]
) -> None:
    judge = signed_in(app, "jo", "adjudicator")
    pid = predicted[1]  # ann: X, ben: nothing
    form = {"labels": [X], "add": ["Bogus Label"], "note": "X & more"}
    response = judge.post(f"/agreement/{SLUG}/{pid}", data=form)
    assert response.status_code == 400
    page = response.get_data(as_text=True)
    card = page.split(f'id="item-{SLUG}-{pid}"', 1)[1].split("</article>", 1)[0]
    assert "Not resolved: not labels of" in card and "Bogus Label" in card and 'role="alert"' in card
    boxes = dict(re.findall(r'<input type="checkbox" name="labels" value="([^"]+)" ?(checked)?', card))
    assert boxes and {label for label, on in boxes.items() if on} == {X}  # as ticked, not as the labels are now
    assert 'name="add" maxlength="200" autocomplete="off" value="Bogus Label"' in card
    assert 'name="note" maxlength="2000" value="X &amp; more"' in card and "autofocus" in card
    assert page.count('role="alert"') == 1  # the reason once, beside its form


def test_a_pending_proposed_label_a_reviewer_gave_is_offered_and_accepted(
    app: Flask, client: FlaskClient, predicted: list[int]
) -> None:
    """Ann proposed a new label (no admin decided yet), Ben did not: the resolve form offers it, so it must take it,
    as a correction would."""
    app.config["REVIEWS_NEEDED"] = 2
    pid, novel = predicted[0], "Novel Task"
    body = {"taxonomy": SLUG, "labels": [], "propose": [novel]}
    url = f"/api/v1/predictions/{pid}/annotations"
    assert client.post(url, json=body, headers=_token(app, "ann", "curator")).status_code == 201
    _review(client, _token(app, "ben", "curator"), pid, {X})
    judge = signed_in(app, "jo", "adjudicator")
    card = judge.get("/agreement").get_data(as_text=True).split(f'id="item-{SLUG}-{pid}"', 1)[1].split("</article>")[0]
    assert f'name="labels" value="{novel}"' in card
    assert judge.post(f"/agreement/{SLUG}/{pid}", data={"labels": [novel, X]}).status_code == 302
    typed = {"taxonomy": SLUG, "action": "adjudicate", "labels": [novel]}  # typed in, or through the API: the same
    assert client.post(url, json=typed, headers=_token(app, "jo", "adjudicator")).status_code == 201
    with app.app_context():
        events = db.session.scalars(select(AnnotationEvent).where(AnnotationEvent.kind == "adjudicated")).all()
        assert [event.added for event in events] == [sorted([novel, X]), [novel]]
    refused = judge.post(f"/agreement/{SLUG}/{pid}", data={"add": ["object detection"]})
    assert refused.status_code == 400 and "object detection is spelt Object Detection" in refused.get_data(as_text=True)


def test_agreement_page_without_enough_reviews_and_unknown_taxonomy(
    curator_client: FlaskClient, predicted: list[int]
) -> None:
    assert "No item has two curator reviews yet." in curator_client.get("/agreement").get_data(as_text=True)
    assert curator_client.get("/agreement?taxonomy=nope").status_code == 404


def test_users_create_adjudicator(app: Flask) -> None:
    result = app.test_cli_runner().invoke(
        args=["users", "create", "jo", "--role", "adjudicator"], input="a long password here\na long password here\n"
    )
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert db.session.scalar(select(User.role).where(User.name == "jo")) == "adjudicator"
