"""The curator's loop on the real app: corrections as append-only diff events, concurrent saves, the review
queue, label proposals, the annotations API with its bad input, and the exports."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import signed_in
from webapp.extensions import db
from webapp.models import AnnotationEvent, LabelProposal, PredictionResult

SLUG = "test-tasks"


@pytest.fixture
def predicted(client: FlaskClient, abstracts: list[dict]) -> list[int]:
    """Ids of ten stored predictions."""
    body = {"abstracts": [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts[:10]]}
    response = client.post("/api/v1/predict", json=body)
    assert response.status_code == 200
    return [p["id"] for p in response.get_json()["predictions"]]


def _result(app: Flask, prediction_id: int) -> PredictionResult:
    with app.app_context():
        result = db.session.scalar(select(PredictionResult).where(PredictionResult.prediction_id == prediction_id))
        db.session.expunge(result)
        return result


def _events(app: Flask, prediction_id: int) -> list[AnnotationEvent]:
    with app.app_context():
        rows = db.session.scalars(
            select(AnnotationEvent).where(AnnotationEvent.prediction_id == prediction_id).order_by(AnnotationEvent.id)
        ).all()
        db.session.expunge_all()
        return list(rows)


def _save(client: FlaskClient, prediction_id: int, query: str = "", **form: object) -> object:
    data = {"based_on": "0", "labels": [], "add": [""], "note": "", **form}
    return client.post(f"/curate/predictions/{prediction_id}/{SLUG}{query}", data=data)


def test_correction_records_the_diff_and_keeps_the_prediction(
    app: Flask, curator_client: FlaskClient, predicted: list[int]
) -> None:
    pid = predicted[0]
    before = _result(app, pid)
    keep = sorted(before.labels)[1:]
    dropped = sorted(before.labels)[:1]
    new = next(label for label in before.scores if label not in before.labels)
    response = _save(curator_client, pid, labels=keep, add=[new, ""], note="checked the paper")
    assert response.status_code == 302
    (event,) = _events(app, pid)
    assert event.added == [new] and event.removed == dropped and event.note == "checked the paper"
    assert _result(app, pid).labels == before.labels  # the original prediction is never changed
    page = curator_client.get(f"/curate/predictions/{pid}").get_data(as_text=True)
    assert "checked the paper" in page and "cora" in page
    history = curator_client.get("/history").get_data(as_text=True)
    assert "reviewed by cora" in history


def test_empty_save_is_refused_with_a_message(app: Flask, curator_client: FlaskClient, predicted: list[int]) -> None:
    """Issue 12 point 1: Save with no change and no note is never silently nothing; Accept would record it."""
    pid = predicted[0]
    response = _save(curator_client, pid, labels=_result(app, pid).labels)
    assert response.status_code == 400
    assert _events(app, pid) == []
    assert "press Accept to confirm the labels" in response.get_data(as_text=True)


def test_two_curators_saving_at_once_keep_both_changes(
    app: Flask, curator_client: FlaskClient, predicted: list[int]
) -> None:
    pid = predicted[0]
    result = _result(app, pid)
    unassigned = [label for label in sorted(result.scores) if label not in result.labels]
    other = signed_in(app, "bob", "curator")
    # Both opened the page when there was no event (based_on 0); Bob saves first, adding one label.
    _save(other, pid, labels=result.labels, add=[unassigned[0]])
    # Cora, from the same starting point, adds another label; she never saw Bob's.
    response = _save(curator_client, pid, labels=result.labels, add=[unassigned[1]])
    bob, cora = _events(app, pid)
    assert bob.added == [unassigned[0]] and cora.added == [unassigned[1]] and cora.removed == []
    page = curator_client.get(response.headers["Location"]).get_data(as_text=True)
    assert "While you were editing, bob saved" in page
    assert unassigned[0] in page and unassigned[1] in page


def test_unknown_labels_are_refused_and_proposals_go_to_admins(
    app: Flask, curator_client: FlaskClient, admin_client: FlaskClient, predicted: list[int]
) -> None:
    pid = predicted[0]
    response = _save(curator_client, pid, labels=_result(app, pid).labels, add=["Protein Folding"])
    assert response.status_code == 400
    assert "Protein Folding" in response.get_data(as_text=True) and _events(app, pid) == []
    response = _save(curator_client, pid, labels=_result(app, pid).labels, propose="Protein Folding")
    assert response.status_code == 302
    (event,) = _events(app, pid)
    assert event.added == ["Protein Folding"]
    # Pending proposals are not training labels yet.
    assert _export_labels(admin_client, pid) == sorted(_result(app, pid).labels)
    with app.app_context():
        proposal_id = db.session.scalar(select(LabelProposal.id))
    assert "Protein Folding" in admin_client.get("/curate/labels").get_data(as_text=True)
    admin_client.post(f"/curate/labels/{proposal_id}", data={"action": "accept", "final_label": "Protein Structure"})
    assert "Protein Structure" in _export_labels(admin_client, pid)
    taxonomies = admin_client.get("/api/v1/taxonomies").get_json()["taxonomies"]
    assert taxonomies[0]["accepted_labels"] == ["Protein Structure"]
    # The accepted (renamed) label is now an ordinary label of the taxonomy for every curator.
    assert _save(curator_client, predicted[1], labels=[], add=["Protein Structure"]).status_code == 302
    again = admin_client.post(f"/curate/labels/{proposal_id}", data={"action": "reject"})
    assert "already accepted" in admin_client.get(again.headers["Location"]).get_data(as_text=True)


def test_rejected_proposals_cannot_come_back(
    app: Flask, curator_client: FlaskClient, admin_client: FlaskClient, predicted: list[int]
) -> None:
    _save(curator_client, predicted[0], propose="Crystal Ball")
    with app.app_context():
        proposal_id = db.session.scalar(select(LabelProposal.id))
    admin_client.post(f"/curate/labels/{proposal_id}", data={"action": "reject"})
    response = _save(curator_client, predicted[1], propose="Crystal Ball")
    assert response.status_code == 400 and "rejected" in response.get_data(as_text=True)
    assert "Crystal Ball" not in _export_labels(admin_client, predicted[0])


@pytest.mark.parametrize("typed", ["object detection", "OBJECT_DETECTION", " Object-Detection "])
def test_a_proposal_that_respells_a_label_is_refused_naming_it(
    app: Flask, client: FlaskClient, curator_client: FlaskClient, predicted: list[int], typed: str
) -> None:
    """The history's filter reads case and separators as one label: a proposal may not add a second spelling of
    one, from the API or the page, and nothing is stored."""
    pid = predicted[0]
    body = {"taxonomy": SLUG, "labels": [], "propose": [typed]}
    response = client.post(f"/api/v1/predictions/{pid}/annotations", json=body, headers=_token(app))
    error = response.get_json()["error"]
    assert response.status_code == 400 and "'Object Detection' spelt another way" in error, error
    assert "add 'Object Detection' instead" in error
    page = _save(curator_client, pid, propose=typed)
    assert page.status_code == 400 and "spelt another way" in page.get_data(as_text=True)
    assert _events(app, pid) == []
    with app.app_context():
        assert db.session.scalar(select(LabelProposal)) is None


def test_a_proposal_that_respells_a_pending_or_rejected_one_is_refused(
    app: Flask, client: FlaskClient, admin_client: FlaskClient, predicted: list[int]
) -> None:
    url = f"/api/v1/predictions/{predicted[0]}/annotations"
    for label in ("Graph Learning", "Crystal Ball"):
        body = {"taxonomy": SLUG, "labels": [], "propose": [label]}
        assert client.post(url, json=body, headers=_token(app)).status_code == 201
    with app.app_context():
        crystal = db.session.scalar(select(LabelProposal.id).where(LabelProposal.label == "Crystal Ball"))
    admin_client.post(f"/curate/labels/{crystal}", data={"action": "reject"})
    other = f"/api/v1/predictions/{predicted[1]}/annotations"

    def propose(label: str) -> object:
        return client.post(other, json={"taxonomy": SLUG, "labels": [], "propose": [label]}, headers=_token(app))

    pending = propose("graph-learning")
    error = pending.get_json()["error"]
    assert pending.status_code == 400 and "'Graph Learning' spelt another way" in error and "proposed" in error
    rejected = propose("crystal_ball")
    assert rejected.status_code == 400
    assert "'crystal_ball' was proposed before as 'Crystal Ball' and rejected" in rejected.get_json()["error"]
    # Named as proposed, the pending label is added, the same proposal.
    same = client.post(other, json={"taxonomy": SLUG, "labels": ["Graph Learning"]}, headers=_token(app, "bob"))
    assert same.status_code == 201 and "Graph Learning" in same.get_json()["labels"]
    with app.app_context():
        assert sorted(db.session.scalars(select(LabelProposal.label))) == ["Crystal Ball", "Graph Learning"]


def test_every_accept_of_a_proposal_refuses_a_second_spelling(app: Flask, predicted: list[int]) -> None:
    """The rule lives in ``decide_proposal``, so a caller other than the labels page gets it too."""
    from webapp.curation.corrections import CorrectionError, decide_proposal
    from webapp.models import Taxonomy, User

    with app.app_context():
        taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == SLUG))
        admin = User(name="root", role="admin", password_hash="-")
        proposal = LabelProposal(taxonomy=taxonomy, label="object_detection", proposed_by=admin)
        db.session.add_all([admin, proposal])
        db.session.commit()
        with pytest.raises(CorrectionError, match="accept it as 'Object Detection'"):
            decide_proposal(proposal, admin, accept=True)
        db.session.rollback()
        with pytest.raises(CorrectionError, match="'anomaly detection' is 'Anomaly Detection'"):
            decide_proposal(proposal, admin, accept=True, final_label="anomaly detection")
        db.session.rollback()
        assert proposal.status == "proposed"
        decide_proposal(proposal, admin, accept=True, final_label="Object Detection")
        assert (proposal.status, proposal.final_label) == ("accepted", "Object Detection")


def _export_labels(client: FlaskClient, prediction_id: int) -> list[str]:
    lines = client.get("/export/annotations.jsonl").get_data(as_text=True).splitlines()
    return next(json.loads(line)["labels"] for line in lines if json.loads(line)["id"] == prediction_id)


def test_queue_is_most_uncertain_first_and_save_and_next_moves_on(
    app: Flask, curator_client: FlaskClient, predicted: list[int]
) -> None:
    with app.app_context():
        order = list(
            db.session.scalars(
                select(PredictionResult.prediction_id).order_by(PredictionResult.margin, PredictionResult.id)
            )
        )
    page = curator_client.get("/curate/queue").get_data(as_text=True)
    positions = [page.index(f"#{pid} ·") for pid in order]
    assert positions == sorted(positions)
    first, second, third = order[:3]
    query = f"?queue=1&taxonomy={SLUG}&label="
    response = _save(curator_client, first, query, labels=_result(app, first).labels, note="fine", action="next")
    assert response.headers["Location"].startswith(f"/curate/predictions/{second}?queue=1")
    # Skip moves on, and the skipped item stays in the queue (at the back of this curator's).
    response = _save(curator_client, second, query, action="skip")
    assert response.headers["Location"].startswith(f"/curate/predictions/{third}?")
    page = curator_client.get("/curate/queue").get_data(as_text=True)
    assert f"#{first} ·" not in page and f"#{second} ·" in page


def test_queue_filters_by_label(app: Flask, curator_client: FlaskClient, predicted: list[int]) -> None:
    label = _result(app, predicted[0]).labels[0]
    page = curator_client.get("/curate/queue", query_string={"label": label, "taxonomy": SLUG}).get_data(as_text=True)
    for pid in predicted:
        assert (f"#{pid} ·" in page) == (label in _result(app, pid).labels)
    assert curator_client.get("/curate/queue?taxonomy=nope").status_code == 404


def _queued(client: FlaskClient, label: str) -> set[int]:
    page = client.get("/curate/queue", query_string={"label": label, "taxonomy": SLUG}).get_data(as_text=True)
    return {int(pid) for pid in re.findall(r"#(\d+) ·", page)}


def test_queue_label_filter_reads_labels_as_the_history_does(
    app: Flask, curator_client: FlaskClient, predicted: list[int]
) -> None:
    """Case and separators do not count, and today's name finds items stored under the old one."""
    label = _result(app, predicted[0]).labels[0]
    carrying = {pid for pid in predicted if label in _result(app, pid).labels}
    assert _queued(curator_client, label) == carrying
    for typed in (label.lower(), label.upper().replace(" ", "_"), f"  {label.replace(' ', '-')} "):
        assert _queued(curator_client, typed) == carrying, typed
    admin = _token(app, "ada", "admin")
    body = {"kind": "rename", "from": label, "to": "Renamed Task"}
    assert curator_client.post(f"/api/v1/taxonomies/{SLUG}/label-changes", json=body, headers=admin).status_code == 201
    assert _queued(curator_client, "renamed_task") == carrying and _queued(curator_client, label) == set()


def test_queue_pages_past_the_end_are_404_and_bad_pages_400(curator_client: FlaskClient, predicted: list[int]) -> None:
    """As the history's pages: an empty 200 past the end would read as "nothing left to review"."""
    assert curator_client.get("/curate/queue?page=1").status_code == 200
    response = curator_client.get("/curate/queue?page=999")
    assert response.status_code == 404 and "there is no page 999; the last page is 1" in response.get_data(as_text=True)
    for page in ("abc", "0", "-1", "1.5", "²", "9999999999"):
        response = curator_client.get("/curate/queue", query_string={"page": page})
        assert response.status_code == 400 and "page must be a whole number" in response.get_data(as_text=True), page
    for path in ("/history", "/label-issues"):  # every list of the curation and history pages alike
        response = curator_client.get(f"{path}?page=999")
        assert response.status_code == 404 and "there is no page 999" in response.get_data(as_text=True), path
        assert curator_client.get(f"{path}?page=abc").status_code == 400, path


def _token(app: Flask, name: str = "cora", role: str = "curator") -> dict[str, str]:
    result = app.test_cli_runner().invoke(args=["tokens", "create", name, "--role", role])
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


def test_api_records_a_correction_as_a_diff(app: Flask, client: FlaskClient, predicted: list[int]) -> None:
    pid = predicted[0]
    result = _result(app, pid)
    new_set = sorted(result.labels)[1:] + ["Speech Recognition"] if "Speech Recognition" not in result.labels else []
    body = {"taxonomy": SLUG, "labels": new_set, "note": "via API"}
    response = client.post(f"/api/v1/predictions/{pid}/annotations", json=body, headers=_token(app))
    assert response.status_code == 201
    out = response.get_json()
    assert out["labels"] == sorted(new_set) and out["predicted"] == sorted(result.labels)
    assert out["events"][0]["user"] == "cora" and out["events"][0]["note"] == "via API"
    again = client.post(f"/api/v1/predictions/{pid}/annotations", json={**body, "note": ""}, headers=_token(app))
    assert again.status_code == 400 and "nothing to save" in again.get_json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"taxonomy": SLUG, "labels": ["cs.LG", "Object Detection"]}, 400, "cs.LG"),
        ({"taxonomy": SLUG, "labels": [""]}, 400, "empty"),
        ({"taxonomy": SLUG, "labels": ["x" * 10_000]}, 400, "at most 200 characters"),
        ({"taxonomy": SLUG, "labels": "Object Detection"}, 400, "list"),
        ({"taxonomy": SLUG, "labels": ["a|b"]}, 400, "separate labels"),
        ({"taxonomy": "nope", "labels": []}, 404, "nope"),
        ({"labels": []}, 400, "taxonomy"),
    ],
)
def test_api_bad_annotations(
    app: Flask, client: FlaskClient, predicted: list[int], body: dict, status: int, message: str
) -> None:
    response = client.post(f"/api/v1/predictions/{predicted[0]}/annotations", json=body, headers=_token(app))
    assert response.status_code == status and message in response.get_json()["error"]
    assert _events(app, predicted[0]) == []


def test_api_unknown_prediction_is_404(app: Flask, client: FlaskClient) -> None:
    response = client.post(
        "/api/v1/predictions/999/annotations", json={"taxonomy": SLUG, "labels": []}, headers=_token(app)
    )
    assert response.status_code == 404 and "999" in response.get_json()["error"]
    assert signed_in(app, "cora2", "curator").get("/curate/predictions/999").status_code == 404


def test_ui_bad_labels_say_what_is_wrong(app: Flask, curator_client: FlaskClient, predicted: list[int]) -> None:
    long = _save(curator_client, predicted[0], propose="y" * 10_000)
    assert long.status_code == 400 and "at most 200 characters" in long.get_data(as_text=True)
    assert _save(curator_client, predicted[0], note="n" * 3000).status_code == 400
    assert _events(app, predicted[0]) == []


def test_exports_stream_predictions_and_corrections(
    app: Flask, curator_client: FlaskClient, predicted: list[int]
) -> None:
    _save(curator_client, predicted[0], labels=[], note="none of these")
    lines = curator_client.get("/export/predictions.jsonl").get_data(as_text=True).splitlines()
    assert [json.loads(line)["id"] for line in lines] == sorted(predicted)
    first = json.loads(lines[0])["results"][SLUG]
    assert first["labels"] == [] and first["reviewed"] and set(first["scores"])
    rows = list(csv.DictReader(io.StringIO(curator_client.get("/export/predictions.csv").get_data(as_text=True))))
    assert len(rows) == len(predicted) and rows[0][f"{SLUG}.labels"] == ""
    corrections = curator_client.get(f"/export/annotations.csv?taxonomy={SLUG}")
    assert corrections.headers["Content-Disposition"].endswith('.csv"')
    (row,) = csv.DictReader(io.StringIO(corrections.get_data(as_text=True)))
    assert row["id"] == str(predicted[0]) and row["reviewers"] == "cora" and row["notes"] == "none of these"
    api = curator_client.get("/api/v1/annotations.csv", headers=_token(app, "bob"))
    assert api.status_code == 200 and api.get_data(as_text=True).count("\n") == 2
    assert curator_client.get("/export/annotations.xml").status_code == 404
    assert curator_client.get("/export/predictions.csv?taxonomy=nope").status_code == 404
