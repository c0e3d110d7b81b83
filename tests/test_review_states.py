"""Issue 12 point 1 (and the undo of point 2): accept, skip, correct and undo through the one review command, from
the annotations API and from the review page's one form over every taxonomy; the queue and live quality after."""

from __future__ import annotations

import re

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import BundleFactory, signed_in
from tests.tiny_bundle import LABELS
from webapp.extensions import db
from webapp.models import AnnotationEvent, PredictionResult, Taxonomy
from webapp.serving.registry import import_bundle

SLUG = "test-tasks"
FIELDS = "test-fields"
FIELD_LABELS = ["Biology", "Chemistry", "Physics", "Mathematics"]


@pytest.fixture
def predicted(client: FlaskClient, abstracts: list[dict]) -> list[int]:
    body = {"abstracts": [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts[:10]]}
    response = client.post("/api/v1/predict", json=body)
    assert response.status_code == 200
    return [p["id"] for p in response.get_json()["predictions"]]


def _token(app: Flask, name: str = "cora") -> dict[str, str]:
    result = app.test_cli_runner().invoke(args=["tokens", "create", name, "--role", "curator"])
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


def _review(client: FlaskClient, headers: dict[str, str], pid: int, **body: object) -> tuple[int, dict]:
    response = client.post(f"/api/v1/predictions/{pid}/annotations", json={"taxonomy": SLUG, **body}, headers=headers)
    return response.status_code, response.get_json()


def _model_labels(app: Flask, pid: int, slug_id: int | None = None) -> list[str]:
    with app.app_context():
        query = select(PredictionResult.labels).where(PredictionResult.prediction_id == pid)
        if slug_id is not None:
            query = query.where(PredictionResult.taxonomy_id == slug_id)
        return sorted(db.session.scalars(query).first())


def _events(app: Flask, pid: int) -> list[tuple[str, str, list[str], list[str], int | None]]:
    with app.app_context():
        rows = db.session.scalars(
            select(AnnotationEvent).where(AnnotationEvent.prediction_id == pid).order_by(AnnotationEvent.id)
        ).all()
        return [(e.kind, e.user.name, e.added, e.removed, e.undoes_id) for e in rows]


def _queue_ids(client: FlaskClient) -> list[int]:
    page = client.get("/curate/queue").get_data(as_text=True)
    return [int(chunk.split(" ", 1)[0]) for chunk in page.split('<div class="meta">#')[1:]]


def test_accept_records_an_event_without_changing_labels_and_leaves_the_queue(
    app: Flask, client: FlaskClient, curator_client: FlaskClient, predicted: list[int]
) -> None:
    pid, headers = predicted[0], _token(app)
    assert pid in _queue_ids(curator_client)
    status, body = _review(client, headers, pid, action="accept", note="right as it is")
    assert status == 201 and body["action"] == "accept" and body["review"] == "accepted"
    assert body["labels"] == body["predicted"] == _model_labels(app, pid)
    assert body["event"]["kind"] == "accepted" and body["event"]["note"] == "right as it is"
    assert _events(app, pid) == [("accepted", "cora", [], [], None)]
    assert pid not in _queue_ids(curator_client)
    reviewed = curator_client.get("/history?reviewed=yes").get_data(as_text=True)
    assert f"#{pid}</span>" in reviewed and "reviewed by cora" in reviewed


def test_live_quality_counts_accepts_as_true_positives_and_negatives(
    app: Flask, client: FlaskClient, predicted: list[int]
) -> None:
    """One corrected item alone gave live micro-F1 0.000; with the accepted items beside it the figures are
    what the reviews say: every kept label a TP, every label the model left out a TN."""
    headers = _token(app)
    first = predicted[0]
    model = _model_labels(app, first)
    _review(client, headers, first, labels=model[1:])  # one false positive
    alone = client.get(f"/api/v1/taxonomies/{SLUG}/quality").get_json()
    assert alone["reviewed"] == 1 and alone["micro"]["fp"] == 1
    accepted = predicted[1:6]
    for pid in accepted:
        assert _review(client, headers, pid, action="accept")[0] == 201
    live = client.get(f"/api/v1/taxonomies/{SLUG}/quality").get_json()
    n_labels = len(LABELS)
    kept = sum(len(_model_labels(app, pid)) for pid in accepted) + len(model) - 1
    micro = live["micro"]
    assert live["reviewed"] == 6
    assert (micro["tp"], micro["fp"], micro["fn"]) == (kept, 1, 0)
    assert micro["tn"] == 6 * n_labels - kept - 1
    assert micro["f1"] == round(2 * kept / (2 * kept + 1), 4) and micro["precision"] == round(kept / (kept + 1), 4)
    # A skip is not a review: it changes no figure.
    _review(client, headers, predicted[7], action="skip")
    assert client.get(f"/api/v1/taxonomies/{SLUG}/quality").get_json()["micro"] == micro


def test_an_empty_correction_is_refused_and_accept_records_it(
    app: Flask, client: FlaskClient, predicted: list[int]
) -> None:
    pid, headers = predicted[0], _token(app)
    status, body = _review(client, headers, pid, labels=_model_labels(app, pid))
    assert status == 400 and "no label changed" in body["error"] and "Accept" in body["error"]
    assert _events(app, pid) == []
    status, body = _review(client, headers, pid, labels=_model_labels(app, pid), note="checked")
    assert status == 201 and body["event"]["kind"] == "correction"  # a note is worth keeping on its own


def test_skip_sends_the_item_to_the_back_of_this_curators_queue_only(
    app: Flask, client: FlaskClient, curator_client: FlaskClient, predicted: list[int]
) -> None:
    before = _queue_ids(curator_client)
    first = before[0]
    status, body = _review(client, _token(app), first, action="skip")
    assert status == 201 and body["review"] is None and body["labels"] == body["predicted"]
    mine = _queue_ids(curator_client)
    assert mine == before[1:] + [first], "a skipped item goes to the back, still in the queue"
    assert _queue_ids(signed_in(app, "bob", "curator")) == before, "another curator's queue is unchanged"
    assert "not reviewed" in curator_client.get(f"/curate/predictions/{first}").get_data(as_text=True)


def test_undo_reverses_ones_own_latest_event_and_undoing_an_undo_reapplies(
    app: Flask, client: FlaskClient, predicted: list[int]
) -> None:
    pid, headers = predicted[0], _token(app)
    model = _model_labels(app, pid)
    _, corrected = _review(client, headers, pid, labels=model[1:])
    assert corrected["labels"] == model[1:] and corrected["review"] == "corrected"
    status, undone = _review(client, headers, pid, action="undo")
    assert status == 201 and undone["labels"] == model and undone["review"] is None
    assert undone["event"]["undoes"] == corrected["event"]["id"]
    status, redone = _review(client, headers, pid, action="undo", event=undone["event"]["id"])
    assert status == 201 and redone["labels"] == model[1:] and redone["review"] == "corrected"
    kinds = [kind for kind, *_ in _events(app, pid)]
    assert kinds == ["correction", "undo", "undo"], "nothing is erased: every step is an event"
    page = client.get(f"/history?label={model[0]}").get_data(as_text=True)
    assert f"#{pid}</span>" not in page, "the redone correction removed that label again"


def test_undo_is_for_ones_own_latest_event_only(app: Flask, client: FlaskClient, predicted: list[int]) -> None:
    pid, cora, bob = predicted[0], _token(app), _token(app, "bob")
    model = _model_labels(app, pid)
    status, body = _review(client, cora, pid, action="undo")
    assert status == 400 and "nothing to undo" in body["error"]
    _, first = _review(client, cora, pid, labels=model[1:])
    _, second = _review(client, cora, pid, action="accept")
    _, bobs = _review(client, bob, pid, action="accept")
    status, body = _review(client, cora, pid, action="undo", event=bobs["event"]["id"])
    assert status == 403 and "bob" in body["error"]
    status, body = _review(client, cora, pid, action="undo", event=first["event"]["id"])
    assert status == 400 and "not your latest" in body["error"]
    status, body = _review(client, cora, pid, action="undo")  # her latest: the accept
    assert status == 201 and body["event"]["undoes"] == second["event"]["id"]
    assert body["labels"] == model[1:], "undoing an accept changes no label"
    assert len(_events(app, pid)) == 4, "refused undos store nothing"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"action": 5}, '"action"'),
        ({"action": "approve"}, '"action"'),
        ({"action": None, "labels": []}, '"action"'),
        ({}, '"labels" is missing'),
        ({"action": "accept", "labels": []}, '"labels"'),
        ({"action": "skip", "propose": ["New label"]}, '"propose"'),
        ({"action": "undo", "event": "1"}, '"event"'),
        ({"action": "undo", "event": True}, '"event"'),
        ({"action": "accept", "event": 1}, '"event"'),
        ({"action": "accept", "note": 7}, "note must be a string"),
    ],
)
def test_bad_review_bodies_are_400_naming_the_field(
    app: Flask, client: FlaskClient, predicted: list[int], body: dict, message: str
) -> None:
    status, out = _review(client, _token(app), predicted[0], **body)
    assert status == 400 and message in out["error"], out
    assert _events(app, predicted[0]) == []


@pytest.fixture
def two_taxonomies(app: Flask, make_bundle: BundleFactory, client: FlaskClient, abstracts: list[dict]) -> int:
    """A prediction answered by two taxonomies; returns its id."""
    with app.app_context():
        import_bundle(make_bundle(seed=3, slug=FIELDS, name="Fields", labels=FIELD_LABELS), actor="tests")
    body = {"abstracts": [{"title": abstracts[0]["title"], "abstract": abstracts[0]["abstract"]}]}
    response = client.post("/api/v1/predict", json=body)
    (prediction,) = response.get_json()["predictions"]
    assert set(prediction["results"]) == {SLUG, FIELDS}
    return prediction["id"]


def _form(app: Flask, pid: int, labels: dict[str, list[str]], **fields: str) -> dict[str, object]:
    """The review page's one form as a browser submits it: every taxonomy's fields under its slug."""
    data: dict[str, object] = dict(fields)
    for slug, chosen in labels.items():
        data.update({f"{slug}-labels": chosen, f"{slug}-add": [""], f"{slug}-note": "", f"{slug}-based_on": "0"})
    return data


def _by_slug(app: Flask, pid: int) -> dict[str, list[str]]:
    with app.app_context():
        rows = db.session.execute(
            select(Taxonomy.slug, PredictionResult.labels)
            .join(Taxonomy, Taxonomy.id == PredictionResult.taxonomy_id)
            .where(PredictionResult.prediction_id == pid)
        )
        return {slug: sorted(labels) for slug, labels in rows}


def test_one_submit_saves_every_taxonomy_on_the_page(
    app: Flask, curator_client: FlaskClient, two_taxonomies: int
) -> None:
    """Ticking a label under one taxonomy and pressing Save (any Save) keeps the edits of both."""
    pid = two_taxonomies
    model = _by_slug(app, pid)
    page = curator_client.get(f"/curate/predictions/{pid}").get_data(as_text=True)
    assert page.count('<form method="post" action="/curate/predictions/') == 1, "one form for the whole page"
    extra = next(label for label in FIELD_LABELS if label not in model[FIELDS])
    labels = {SLUG: model[SLUG][1:], FIELDS: model[FIELDS] + [extra]}
    response = curator_client.post(f"/curate/predictions/{pid}", data=_form(app, pid, labels, action="save"))
    assert response.status_code == 302
    events = _events(app, pid)
    assert sorted((kind, added, removed) for kind, _, added, removed, _ in events) == sorted(
        [("correction", [], model[SLUG][:1]), ("correction", [extra], [])]
    )
    flashes = curator_client.get(response.headers["Location"]).get_data(as_text=True)
    assert "Saved Fields: added " + extra in flashes and "Saved Test tasks: removed" in flashes


def test_accept_on_the_page_confirms_unchanged_taxonomies_and_saves_changed_ones(
    app: Flask, curator_client: FlaskClient, two_taxonomies: int
) -> None:
    pid = two_taxonomies
    model = _by_slug(app, pid)
    labels = {SLUG: model[SLUG], FIELDS: model[FIELDS][:-1] if model[FIELDS] else FIELD_LABELS[:1]}
    response = curator_client.post(f"/curate/predictions/{pid}", data=_form(app, pid, labels, action="accept"))
    assert response.status_code == 302
    kinds = sorted(kind for kind, *_ in _events(app, pid))
    assert kinds == ["accepted", "correction"]


def test_a_refused_page_save_stores_nothing_and_keeps_what_was_ticked(
    app: Flask, curator_client: FlaskClient, two_taxonomies: int
) -> None:
    pid = two_taxonomies
    model = _by_slug(app, pid)
    extra = next(label for label in FIELD_LABELS if label not in model[FIELDS])
    labels = {SLUG: model[SLUG] + ["Not a label at all"], FIELDS: model[FIELDS] + [extra]}
    response = curator_client.post(f"/curate/predictions/{pid}", data=_form(app, pid, labels, action="save"))
    assert response.status_code == 400
    page = response.get_data(as_text=True)
    assert "Not a label at all" in page and 'role="alert"' in page
    assert f'name="{FIELDS}-labels" value="{extra}" checked' in page, "the other taxonomy's edit is kept"
    assert _events(app, pid) == [], "one transaction: the valid taxonomy is not saved alone"
    nothing = curator_client.post(f"/curate/predictions/{pid}", data=_form(app, pid, model, action="save")).get_data(
        as_text=True
    )
    assert "press Accept to confirm the labels" in nothing


def test_undo_and_skip_buttons_on_the_page(app: Flask, curator_client: FlaskClient, two_taxonomies: int) -> None:
    pid = two_taxonomies
    model = _by_slug(app, pid)
    page = curator_client.get(f"/curate/predictions/{pid}").get_data(as_text=True)
    assert "Undo my last change" not in page
    labels = {SLUG: model[SLUG][1:], FIELDS: model[FIELDS]}
    curator_client.post(f"/curate/predictions/{pid}", data=_form(app, pid, labels, action="save"))
    page = curator_client.get(f"/curate/predictions/{pid}").get_data(as_text=True)
    assert f'value="undo:{SLUG}"' in page and f'value="undo:{FIELDS}"' not in page
    response = curator_client.post(f"/curate/predictions/{pid}", data={"action": f"undo:{SLUG}"})
    assert response.status_code == 302
    assert [kind for kind, *_ in _events(app, pid)] == ["correction", "undo"]
    assert curator_client.post(f"/curate/predictions/{pid}", data={"action": "undo:nope"}).status_code == 400
    assert curator_client.post(f"/curate/predictions/{pid}", data={"action": "delete"}).status_code == 400
    query = f"?queue=1&taxonomy={SLUG}&label="
    response = curator_client.post(f"/curate/predictions/{pid}{query}", data={"action": "skip"})
    assert response.status_code == 302
    assert [kind for kind, *_ in _events(app, pid)].count("skipped") == 2, "one skip per taxonomy the model answered"


def test_an_accept_based_on_labels_changed_since_is_refused_and_shows_the_labels_now(
    app: Flask, client: FlaskClient, curator_client: FlaskClient, predicted: list[int]
) -> None:
    """Cora opened the page (based on no event); Bob then corrected the labels through the API. Her Accept asserts
    the labels she saw: it must not become agreement with Bob's, which she never saw."""
    pid = predicted[0]
    model = _model_labels(app, pid)
    bobs_labels = [label for label in LABELS if label not in model][:1]
    status, bob = _review(client, _token(app, "bob"), pid, labels=bobs_labels)
    assert status == 201
    stale = _form(app, pid, {SLUG: model}, action="accept")
    response = curator_client.post(f"/curate/predictions/{pid}", data=stale)
    assert response.status_code == 409
    page = response.get_data(as_text=True)
    assert "Not accepted" in page and "bob changed the labels of Test tasks" in page
    assert f'name="{SLUG}-based_on" type="hidden" value="{bob["event"]["id"]}"' in page, "the page is based on now"
    ticked = re.findall(rf'name="{SLUG}-labels" value="([^"]+)" checked', page)
    assert ticked == bobs_labels, "the boxes show the labels now, not the ones Cora had"
    assert [(kind, user) for kind, user, *_ in _events(app, pid)] == [("correction", "bob")]
    # Having seen Bob's labels, she may accept them.
    seen = {**_form(app, pid, {SLUG: bobs_labels}, action="accept"), f"{SLUG}-based_on": str(bob["event"]["id"])}
    assert curator_client.post(f"/curate/predictions/{pid}", data=seen).status_code == 302
    assert [(kind, user) for kind, user, *_ in _events(app, pid)] == [("correction", "bob"), ("accepted", "cora")]


def test_a_stale_accept_is_refused_from_the_queue_keys_too(
    app: Flask, client: FlaskClient, curator_client: FlaskClient, predicted: list[int]
) -> None:
    """The `a` key in the queue presses "accept-next": refused, it stays on the item instead of moving on."""
    pid = predicted[0]
    model = _model_labels(app, pid)
    assert _review(client, _token(app, "bob"), pid, labels=model[1:])[0] == 201
    query = f"?queue=1&taxonomy={SLUG}&label="
    response = curator_client.post(
        f"/curate/predictions/{pid}{query}", data=_form(app, pid, {SLUG: model}, action="accept-next")
    )
    assert response.status_code == 409 and "Not accepted" in response.get_data(as_text=True)
    assert [user for _, user, *_ in _events(app, pid)] == ["bob"]


def test_a_stale_accept_stores_nothing_in_any_taxonomy(
    app: Flask, client: FlaskClient, curator_client: FlaskClient, two_taxonomies: int
) -> None:
    """One submit is one review: the taxonomy that changed meanwhile is shown afresh, the other keeps its ticks."""
    pid = two_taxonomies
    model = _by_slug(app, pid)
    extra = next(label for label in FIELD_LABELS if label not in model[FIELDS])
    response = client.post(
        f"/api/v1/predictions/{pid}/annotations",
        json={"taxonomy": FIELDS, "labels": model[FIELDS] + [extra]},
        headers=_token(app, "bob"),
    )
    assert response.status_code == 201
    labels = {SLUG: model[SLUG][1:], FIELDS: model[FIELDS]}
    response = curator_client.post(f"/curate/predictions/{pid}", data=_form(app, pid, labels, action="accept"))
    assert response.status_code == 409
    page = response.get_data(as_text=True)
    assert f'name="{FIELDS}-labels" value="{extra}" checked' in page
    assert f'name="{SLUG}-labels" value="{model[SLUG][0]}" checked' not in page, "Cora's untick is kept"
    assert [user for _, user, *_ in _events(app, pid)] == ["bob"]


def test_an_accept_stands_when_others_only_reviewed_meanwhile(
    app: Flask, client: FlaskClient, curator_client: FlaskClient, predicted: list[int]
) -> None:
    """Another curator's accept or skip leaves the labels as Cora saw them: her accept is agreement, recorded."""
    pid, bob = predicted[0], _token(app, "bob")
    assert _review(client, bob, pid, action="accept")[0] == 201
    assert _review(client, bob, pid, action="skip")[0] == 201
    response = curator_client.post(
        f"/curate/predictions/{pid}", data=_form(app, pid, {SLUG: _model_labels(app, pid)}, action="accept")
    )
    assert response.status_code == 302
    assert [(kind, user) for kind, user, *_ in _events(app, pid)][-1] == ("accepted", "cora")


def test_an_api_accept_based_on_labels_changed_since_is_refused_like_the_pages(
    app: Flask, client: FlaskClient, predicted: list[int]
) -> None:
    """Cora read the item (no event yet) and accepts through the API after Bob changed the labels: a 409 with the
    labels now and the event to base on, nothing stored; based on that event, her accept stands."""
    pid, cora = predicted[0], _token(app)
    model = _model_labels(app, pid)
    status, bob = _review(client, _token(app, "bob"), pid, labels=model[1:])
    assert status == 201
    response = client.post(
        f"/api/v1/predictions/{pid}/annotations",
        json={"taxonomy": SLUG, "action": "accept", "based_on": 0},
        headers=cora,
    )
    body = response.get_json()
    assert response.status_code == 409 and "Not accepted" in body["error"] and "bob changed the labels" in body["error"]
    assert body["labels"] == bob["labels"] == model[1:] and body["based_on"] == bob["event"]["id"]
    assert [user for _, user, *_ in _events(app, pid)] == ["bob"]
    status, accepted = _review(client, cora, pid, action="accept", based_on=body["based_on"])
    assert status == 201 and accepted["event"]["kind"] == "accepted" and accepted["labels"] == model[1:]
    # Without based_on an accept confirms the labels as they stand, as before.
    assert _review(client, _token(app, "dan"), pid, action="accept")[0] == 201


@pytest.mark.parametrize("based_on", ["3", 1.5, -1, True, [1], 2**31])
def test_an_api_based_on_that_is_not_an_event_id_is_a_400_naming_it(
    app: Flask, client: FlaskClient, predicted: list[int], based_on: object
) -> None:
    status, body = _review(client, _token(app), predicted[0], action="accept", based_on=based_on)
    assert status == 400 and '"based_on" is an event id (a whole number)' in body["error"]
    assert _events(app, predicted[0]) == []


def test_an_api_based_on_goes_with_accept_only(app: Flask, client: FlaskClient, predicted: list[int]) -> None:
    for body in ({"action": "skip", "based_on": 0}, {"labels": [], "based_on": 0}):
        status, answer = _review(client, _token(app), predicted[0], **body)
        assert status == 400 and 'only with "action": "accept"' in answer["error"], body
    assert _events(app, predicted[0]) == []


def _badge(page: str, pid: int) -> str:
    row = page.split(f"<span>#{pid}</span>", 1)[1].split("</div>", 1)[0]
    return re.search(r'<span class="badge[^"]*">([^<]*)</span>', row).group(1)


def test_the_history_badge_reads_the_chosen_taxonomy(
    app: Flask, client: FlaskClient, curator_client: FlaskClient, two_taxonomies: int
) -> None:
    """Reviewed in Fields only: "reviewed by bob" there and with all taxonomies, "not reviewed" under Test tasks,
    as the Review filter lists it."""
    pid = two_taxonomies
    status, _ = _review(client, _token(app, "bob"), pid, taxonomy=FIELDS, action="accept")
    assert status == 201
    assert _badge(curator_client.get("/history").get_data(as_text=True), pid) == "reviewed by bob"
    fields = curator_client.get("/history", query_string={"taxonomy": FIELDS}).get_data(as_text=True)
    assert _badge(fields, pid) == "reviewed by bob"
    tasks = curator_client.get("/history", query_string={"taxonomy": SLUG}).get_data(as_text=True)
    assert _badge(tasks, pid) == "not reviewed"
    unreviewed = curator_client.get("/history", query_string={"taxonomy": SLUG, "reviewed": "no"})
    assert _badge(unreviewed.get_data(as_text=True), pid) == "not reviewed"
    _review(client, _token(app, "cora"), pid, action="accept")
    assert _badge(curator_client.get("/history").get_data(as_text=True), pid) == "reviewed by bob, cora"
    tasks = curator_client.get("/history", query_string={"taxonomy": SLUG}).get_data(as_text=True)
    assert _badge(tasks, pid) == "reviewed by cora"
