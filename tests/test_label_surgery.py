"""Label surgery on the real app: renames, merges and splits read through by every page, the API, the exports,
the history and queue filters, corrections and the trainer's data; undo restores exactly; nothing stored is
rewritten; bad input and the wrong role are refused with a clear 4xx."""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, text
from werkzeug.serving import make_server

from tests.conftest import BundleFactory, make_app, signed_in
from tests.test_batch import job_id_of, make_csv, paper_rows, upload, wait_for
from tests.tiny_bundle import LABELS
from trainer.__main__ import main
from trainer.data import Paper, relabel
from trainer.publish import DatabaseTarget, SiteTarget
from webapp.config import REPO_ROOT
from webapp.extensions import db
from webapp.labels import record_change
from webapp.models import LabelChange, PredictionResult
from webapp.serving.bundle import compose_text, read_manifest
from webapp.serving.registry import get_taxonomy, import_bundle

SLUG = "test-tasks"
STORED_TABLES = ("predictions", "prediction_results", "predicted_labels", "annotation_events")


@pytest.fixture
def predicted(client: FlaskClient, abstracts: list[dict]) -> list[int]:
    body = {"abstracts": [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts[:12]]}
    response = client.post("/api/v1/predict", json=body)
    assert response.status_code == 200
    return [p["id"] for p in response.get_json()["predictions"]]


def token(app: Flask, name: str = "ada", role: str = "admin") -> dict[str, str]:
    result = app.test_cli_runner().invoke(args=["tokens", "create", name, "--role", role])
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


def stored(app: Flask) -> dict[str, list[tuple]]:
    """Every row of the tables label surgery must never rewrite."""
    with app.app_context():
        return {
            table: [tuple(row) for row in db.session.execute(text(f"SELECT * FROM {table} ORDER BY id"))]
            for table in STORED_TABLES
        }


def results(app: Flask) -> dict[int, tuple[list[str], dict[str, float], str]]:
    """Prediction id -> (stored labels, stored scores, text)."""
    with app.app_context():
        rows = db.session.scalars(select(PredictionResult)).all()
        return {
            r.prediction_id: (list(r.labels), dict(r.scores), compose_text(r.prediction.title, r.prediction.abstract))
            for r in rows
        }


def most_predicted(app: Flask, count: int = 1) -> list[str]:
    tally: dict[str, int] = {}
    for labels, _, _ in results(app).values():
        for label in labels:
            tally[label] = tally.get(label, 0) + 1
    return sorted(tally, key=lambda label: (-tally[label], label))[:count]


def change(client: FlaskClient, headers: dict[str, str], **body: object):  # noqa: ANN201 - a test response
    return client.post(f"/api/v1/taxonomies/{SLUG}/label-changes", json=body, headers=headers)


def export(client: FlaskClient, headers: dict[str, str]) -> dict[int, dict]:
    lines = client.get("/api/v1/predictions.jsonl", headers=headers).get_data(as_text=True).splitlines()
    return {record["id"]: record["results"][SLUG] for record in map(json.loads, lines)}


def annotations(client: FlaskClient, headers: dict[str, str]) -> dict[int, list[str]]:
    lines = client.get("/api/v1/annotations", headers=headers).get_data(as_text=True).splitlines()
    return {record["id"]: record["labels"] for record in map(json.loads, lines)}


def taxonomy_labels(client: FlaskClient) -> list[str]:
    (taxonomy,) = client.get("/api/v1/taxonomies").get_json()["taxonomies"]
    return taxonomy["labels"]


def history_ids(client: FlaskClient, label: str) -> set[int]:
    page = client.get("/history", query_string={"label": label}).get_data(as_text=True)
    return {int(pid) for pid in re.findall(r'href="/predictions/(\d+)"', page)}


def test_rename_is_read_everywhere_and_rewrites_nothing(app: Flask, client: FlaskClient, predicted: list[int]) -> None:
    admin = token(app)
    (old,) = most_predicted(app)
    before_rows, before_export = stored(app), export(client, admin)
    carrying = {pid for pid, (labels, _, _) in results(app).items() if old in labels}
    response = change(client, admin, kind="rename", **{"from": old, "to": "Renamed Task"}, note="clearer")
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["actor"] == "api:ada" and response.get_json()["undone_at"] is None

    assert stored(app) == before_rows, "a rename rewrote stored predictions"
    assert "Renamed Task" in taxonomy_labels(client) and old not in taxonomy_labels(client)
    after = export(client, admin)
    for pid in predicted:
        expected = sorted("Renamed Task" if label == old else label for label in before_export[pid]["predicted"])
        assert after[pid]["predicted"] == expected
        assert after[pid]["scores"]["Renamed Task"] == before_export[pid]["scores"][old]
        assert old not in after[pid]["scores"]
    assert history_ids(client, "Renamed Task") == carrying and history_ids(client, old) == set()
    pid = sorted(carrying)[0]
    page = client.get(f"/predictions/{pid}").get_data(as_text=True)
    card = page.split('class="card result"')[1].split("</section>")[0]
    assert ">Renamed Task<" in card and f">{old}<" not in card

    # A correction made now is stored in the new names and diffs against what the model said, mapped.
    curator = token(app, "cora", "curator")
    kept = [label for label in after[pid]["predicted"] if label != "Renamed Task"]
    body = {"taxonomy": SLUG, "labels": kept}
    answer = client.post(f"/api/v1/predictions/{pid}/annotations", json=body, headers=curator)
    assert answer.status_code == 201
    assert answer.get_json()["events"][0]["removed"] == ["Renamed Task"]
    assert answer.get_json()["predicted"] == after[pid]["predicted"]
    assert annotations(client, curator) == {pid: kept}
    old_name = client.post(f"/api/v1/predictions/{pid}/annotations", json={**body, "labels": [old]}, headers=curator)
    assert old_name.status_code == 400 and f"{old} is now Renamed Task" in old_name.get_json()["error"]
    queue = signed_in(app, "cur", "curator").get("/curate/queue", query_string={"label": "Renamed Task"})
    assert {int(i) for i in re.findall(r"#(\d+) ·", queue.get_data(as_text=True))} == carrying - {pid}


def test_merge_takes_the_best_source_and_old_and_new_corrections_stay_right(
    app: Flask, client: FlaskClient, predicted: list[int]
) -> None:
    admin, curator = token(app), token(app, "cora", "curator")
    first, second = most_predicted(app, 2)
    stored_results = results(app)
    both = [pid for pid, (labels, _, _) in stored_results.items() if {first, second} <= set(labels)]
    either = {pid for pid, (labels, _, _) in stored_results.items() if {first, second} & set(labels)}
    assert both, "the fixture model predicts the two most frequent labels together somewhere"
    # Before the merge a curator removes only the first label of an item carrying both.
    pid = both[0]
    keep = [label for label in stored_results[pid][0] if label != first]
    old_event = {"taxonomy": SLUG, "labels": keep}
    assert client.post(f"/api/v1/predictions/{pid}/annotations", json=old_event, headers=curator).status_code == 201

    assert change(client, admin, kind="merge", sources=[first, second], into="Merged").status_code == 201
    after = export(client, admin)
    for item, (labels, scores, _) in stored_results.items():
        assert ("Merged" in after[item]["predicted"]) == bool({first, second} & set(labels))
        assert after[item]["scores"]["Merged"] == max(scores[first], scores[second])  # one threshold for all
    assert history_ids(client, "Merged") == either
    # The old removal of one source keeps the merged label (its sibling stayed) ...
    assert "Merged" in annotations(client, curator)[pid]
    # ... and a removal under the merged name removes it.
    now = [label for label in annotations(client, curator)[pid] if label != "Merged"]
    new_event = {"taxonomy": SLUG, "labels": now}
    response = client.post(f"/api/v1/predictions/{pid}/annotations", json=new_event, headers=curator)
    assert response.status_code == 201 and response.get_json()["events"][-1]["removed"] == ["Merged"]
    assert "Merged" not in annotations(client, curator)[pid]


def test_split_routes_by_keyword_with_the_same_rule_for_the_trainer(
    app: Flask, client: FlaskClient, predicted: list[int]
) -> None:
    admin = token(app)
    (label,) = most_predicted(app)
    carrying = {pid: t for pid, (labels, _, t) in results(app).items() if label in labels}
    assert len(carrying) >= 2
    # A word in some carrying texts but not all of them, so both targets get items.
    words = {pid: set(re.findall(r"[a-z]{6,}", t.lower())) for pid, t in carrying.items()}
    keyword = next(w for w in sorted(set.union(*words.values())) if not all(w in ws for ws in words.values()))
    routed = {pid for pid, ws in words.items() if keyword in ws}
    targets = [{"name": "Keyword Part", "keywords": [keyword.upper()]}, {"name": "The Rest"}]

    preview = change(client, admin, kind="split", label=label, targets=targets, preview=True)
    assert preview.status_code == 200 and preview.get_json()["preview"]["predictions"] == len(carrying)
    assert preview.get_json()["preview"]["targets"] == {
        "Keyword Part": {"predictions": len(routed), "corrections": 0},
        "The Rest": {"predictions": len(carrying) - len(routed), "corrections": 0},
    }
    assert db_changes(app) == [], "a preview stored a change"

    assert change(client, admin, kind="split", label=label, targets=targets).status_code == 201
    after = export(client, admin)
    for pid in carrying:
        assert ("Keyword Part" in after[pid]["predicted"]) == (pid in routed)
        assert ("The Rest" in after[pid]["predicted"]) == (pid not in routed)
    assert history_ids(client, "Keyword Part") == routed
    assert history_ids(client, "The Rest") == set(carrying) - routed
    counts = signed_in(app, "root", "admin").get(f"/taxonomies/{SLUG}/labels").get_data(as_text=True)
    assert "Keyword Part" in counts and "The Rest" in counts

    # The trainer relabels its base papers through the site's rules: over HTTP and from the database alike.
    papers = [Paper(str(pid), "", t, [label, "Other"]) for pid, t in carrying.items()]
    with serving(app) as url:
        over_http = relabel(papers, SiteTarget(url, admin["Authorization"].split()[1]).label_changes(SLUG))
    from_database = relabel(papers, DatabaseTarget(app.config["SQLALCHEMY_DATABASE_URI"]).label_changes(SLUG))
    for paper in (*over_http, *from_database):
        expected = "Keyword Part" if int(paper.id) in routed else "The Rest"
        assert paper.labels == sorted(["Other", expected])
    log = client.get(f"/api/v1/taxonomies/{SLUG}/label-changes", headers=admin).get_json()
    assert set(log["labels"]) >= {"Keyword Part", "The Rest"} and label not in log["labels"]


def db_changes(app: Flask) -> list[tuple]:
    with app.app_context():
        return [tuple(row) for row in db.session.execute(select(LabelChange.id, LabelChange.undone_at))]


class serving:  # noqa: N801 - a context manager used like a function
    """The app on a real HTTP server in a thread, for the trainer's SiteTarget."""

    def __init__(self, app: Flask) -> None:
        self.server = make_server("127.0.0.1", 0, app, threaded=True)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_port}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def test_undo_restores_exactly_and_waits_for_dependent_changes(
    app: Flask, client: FlaskClient, predicted: list[int]
) -> None:
    admin, curator = token(app), token(app, "cora", "curator")
    first, second, third = most_predicted(app, 3)
    pid = next(pid for pid, (labels, _, _) in results(app).items() if first in labels)
    kept = [label for label in results(app)[pid][0] if label != first]
    client.post(f"/api/v1/predictions/{pid}/annotations", json={"taxonomy": SLUG, "labels": kept}, headers=curator)
    views = lambda: (  # noqa: E731
        export(client, admin),
        annotations(client, curator),
        taxonomy_labels(client),
        client.get(f"/predictions/{pid}").get_data(as_text=True),
    )
    before, rows = views(), stored(app)

    rename = change(client, admin, kind="rename", **{"from": first, "to": "Step One"}).get_json()["id"]
    merge = change(client, admin, kind="merge", sources=["Step One", second, third], into=third).get_json()["id"]
    assert views() != before
    refused = client.post(f"/api/v1/taxonomies/{SLUG}/label-changes/{rename}/undo", headers=admin)
    assert refused.status_code == 409 and f"undo change #{merge} first" in refused.get_json()["error"]
    for change_id in (merge, rename):
        response = client.post(f"/api/v1/taxonomies/{SLUG}/label-changes/{change_id}/undo", headers=admin)
        assert response.status_code == 200 and response.get_json()["undone_by"] == "api:ada"
    assert views() == before, "undo did not restore every view exactly"
    assert stored(app) == rows
    again = client.post(f"/api/v1/taxonomies/{SLUG}/label-changes/{rename}/undo", headers=admin)
    assert again.status_code == 409 and "already undone" in again.get_json()["error"]
    assert [undone is not None for _, undone in db_changes(app)] == [True, True], "undo must keep the change"


def test_undo_is_refused_once_corrections_use_the_new_names(
    app: Flask, client: FlaskClient, predicted: list[int]
) -> None:
    admin, curator = token(app), token(app, "cora", "curator")
    stored_results = results(app)
    # The most predicted label that some prediction lacks, so a correction can add it under its new name.
    label = next(
        label
        for label in most_predicted(app, count=len(LABELS))
        if any(label not in labels for labels, _, _ in stored_results.values())
    )
    change_id = change(client, admin, kind="rename", **{"from": label, "to": "Fresh"}).get_json()["id"]
    pid = next(pid for pid, (labels, _, _) in stored_results.items() if label not in labels)
    body = {"taxonomy": SLUG, "labels": [*export(client, admin)[pid]["predicted"], "Fresh"]}
    assert client.post(f"/api/v1/predictions/{pid}/annotations", json=body, headers=curator).status_code == 201
    refused = client.post(f"/api/v1/taxonomies/{SLUG}/label-changes/{change_id}/undo", headers=admin)
    assert refused.status_code == 409 and "1 correction(s)" in refused.get_json()["error"]
    assert db_changes(app)[0][1] is None


OD = "Object Detection"


def split(*targets: object) -> dict:
    return {"kind": "split", "label": OD, "targets": list(targets)}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"kind": "rename", "from": "No Such Label", "to": "X"}, "not a label"),
        ({"kind": "rename", "from": OD, "to": "   "}, "empty"),
        ({"kind": "rename", "from": OD, "to": "Image Classification"}, "merge the labels instead"),
        ({"kind": "rename", "from": OD, "to": OD}, "the old one"),
        ({"kind": "rename", "from": OD, "to": "a|b"}, "separate labels"),
        ({"kind": "rename", "from": [OD], "to": "X"}, "strings"),
        ({"kind": "merge", "sources": [OD], "into": "X"}, "at least two"),
        ({"kind": "merge", "sources": [OD, OD], "into": "X"}, "at least two"),
        ({"kind": "merge", "sources": OD, "into": "X"}, "list"),
        ({"kind": "merge", "sources": [OD, "Code Generation"], "into": "Image Classification"}, "exists"),
        (split({"name": "A", "keywords": ["a"]}, {"name": "B", "keywords": ["b"]}), "default"),
        (split({"name": "A"}, {"name": "B"}), "only one target"),
        (split({"name": "A"}), "two targets"),
        (split({"name": "A"}, {"name": "A", "keywords": ["a"]}), "twice"),
        (split({"name": "A"}, {"name": "B", "keywords": "b"}), "list of strings"),
        (split({"name": "A"}, "B"), "each target"),
        (split({"name": "A"}, {"name": "Code Generation", "keywords": ["c"]}), "exists"),
        ({"kind": "delete", "label": OD}, "kind must be"),
        ({"kind": "rename", "from": OD, "to": "X", "note": "n" * 3000}, "at most 2000"),
    ],
)
def test_bad_changes_are_400_and_store_nothing(app: Flask, client: FlaskClient, body: dict, message: str) -> None:
    response = change(client, token(app), **body)
    assert response.status_code == 400 and message in response.get_json()["error"], response.get_json()
    assert db_changes(app) == []


@pytest.mark.parametrize(
    ("body", "existing"),
    [
        ({"kind": "rename", "from": "Image Classification", "to": "object detection"}, OD),
        ({"kind": "rename", "from": "Image Classification", "to": "OBJECT_DETECTION"}, OD),
        ({"kind": "merge", "sources": ["Image Classification", "Code Generation"], "into": "object-detection"}, OD),
        (split({"name": "Part", "keywords": ["p"]}, {"name": "code  generation"}), "Code Generation"),
    ],
)
def test_a_new_name_that_reads_as_an_existing_label_is_refused(
    app: Flask, client: FlaskClient, body: dict, existing: str
) -> None:
    """The history's label filter reads case and separators as one label, so a new name may not differ from an
    existing label only by them: the preview and the change are refused naming it, and nothing is stored."""
    admin = token(app)
    for flags in ({"preview": True}, {}):
        response = change(client, admin, **body, **flags)
        error = response.get_json()["error"]
        assert response.status_code == 400 and "already exists" in error and repr(existing) in error, error
    assert db_changes(app) == []
    assert sorted(taxonomy_labels(client)) == sorted(LABELS)


def test_a_split_may_not_name_two_targets_alike(app: Flask, client: FlaskClient) -> None:
    response = change(client, token(app), **split({"name": "Part A", "keywords": ["a"]}, {"name": "part_a"}))
    assert response.status_code == 400 and "'part_a' (read as 'Part A'" in response.get_json()["error"]
    assert db_changes(app) == []


def test_a_label_may_be_respelt_but_not_take_a_retired_name_in_another_case(
    app: Flask, client: FlaskClient, predicted: list[int]
) -> None:
    admin = token(app)
    carrying = history_ids(client, OD)
    assert change(client, admin, kind="rename", **{"from": OD, "to": "object detection"}).status_code == 201
    assert "object detection" in taxonomy_labels(client) and OD not in taxonomy_labels(client)
    assert history_ids(client, "object detection") == carrying
    sources = ["object detection", "Code Generation"]
    assert change(client, admin, kind="merge", sources=sources, into="Object-Detection").status_code == 201
    assert change(client, admin, kind="rename", **{"from": "Anomaly Detection", "to": "Detection"}).status_code == 201
    reuse = change(client, admin, kind="rename", **{"from": "Image Classification", "to": "anomaly detection"})
    error = reuse.get_json()["error"]
    assert reuse.status_code == 400 and "was a label before" in error and "'Anomaly Detection'" in error


def test_the_labels_page_refuses_a_rename_onto_a_label_in_another_case(app: Flask, predicted: list[int]) -> None:
    root = signed_in(app, "root", "admin")
    form = {"label": "Image Classification", "to": "object detection"}
    for action in ("preview", "apply"):
        response = root.post(f"/taxonomies/{SLUG}/labels/rename", data={**form, "action": action})
        page = response.get_data(as_text=True)
        assert response.status_code == 400 and "merge the labels instead" in page and "Object Detection" in page
    assert db_changes(app) == []


def test_a_proposal_is_not_accepted_as_a_label_in_another_case(
    app: Flask, client: FlaskClient, predicted: list[int]
) -> None:
    """Accepting a proposal adds its name to the taxonomy: a name reading as an existing label is refused with that
    label named, and the taxonomy's label set is unchanged; accepting it as that label is fine."""
    curator = token(app, "cora", "curator")
    body = {"taxonomy": SLUG, "labels": [], "propose": ["Novel Task"]}
    assert client.post(f"/api/v1/predictions/{predicted[0]}/annotations", json=body, headers=curator).status_code == 201
    root = signed_in(app, "root", "admin")
    for typed in ("object detection", "OBJECT-DETECTION"):
        refused = root.post("/curate/labels/1", data={"action": "accept", "final_label": typed}, follow_redirects=True)
        assert "accept it as &#39;Object Detection&#39;" in refused.get_data(as_text=True)
    (taxonomy,) = client.get("/api/v1/taxonomies").get_json()["taxonomies"]
    assert taxonomy["accepted_labels"] == [] and sorted(taxonomy["labels"]) == sorted(LABELS)
    assert root.post("/curate/labels/1", data={"action": "accept", "final_label": OD}).status_code == 302
    (taxonomy,) = client.get("/api/v1/taxonomies").get_json()["taxonomies"]
    assert taxonomy["accepted_labels"] == [OD] and sorted(taxonomy["labels"]) == sorted(LABELS)


def test_bad_requests_roles_and_unknown_records(app: Flask, client: FlaskClient) -> None:
    admin = token(app)
    url = f"/api/v1/taxonomies/{SLUG}/label-changes"
    assert client.post(url, data="x", headers=admin).status_code == 415
    assert client.post(url, data="{", headers=admin, content_type="application/json").status_code == 400
    assert client.post(url, json=["rename"], headers=admin).status_code == 400
    assert client.post(url, json={"kind": "rename"}).status_code == 401
    assert client.post(url, json={"kind": "rename"}, headers=token(app, "cora", "curator")).status_code == 403
    assert client.post("/api/v1/taxonomies/nope/label-changes", json={}, headers=admin).status_code == 404
    assert client.post(f"{url}/99/undo", headers=admin).status_code == 404
    assert client.get("/api/v1/taxonomies/nope/label-changes", headers=admin).status_code == 404
    assert client.get(url).status_code == 401  # label-change actors are people: never public (issue 11 point 12)
    # A retired name is not free again: items stored under it would read as the new label.
    assert change(client, admin, kind="rename", **{"from": "Object Detection", "to": "Detection"}).status_code == 201
    reuse = change(client, admin, kind="rename", **{"from": "Code Generation", "to": "Object Detection"})
    assert reuse.status_code == 400 and "was a label before" in reuse.get_json()["error"]

    assert client.get(f"/taxonomies/{SLUG}/labels").status_code == 302  # to the sign-in page
    assert signed_in(app, "carl", "curator").get(f"/taxonomies/{SLUG}/labels").status_code == 403
    curator = signed_in(app, "cor2", "curator")
    assert (
        curator.post(f"/taxonomies/{SLUG}/labels/rename", data={"label": "Code Generation", "to": "Y"}).status_code
        == 403
    )
    root = signed_in(app, "root", "admin")
    assert root.get("/taxonomies/nope/labels").status_code == 404
    assert root.post(f"/taxonomies/{SLUG}/labels/delete", data={}).status_code == 404
    assert root.post(f"/taxonomies/{SLUG}/labels/changes/99/undo").status_code == 404
    assert len(db_changes(app)) == 1


def test_admin_page_previews_applies_and_undoes(app: Flask, predicted: list[int]) -> None:
    root = signed_in(app, "root", "admin")
    (label,) = most_predicted(app)
    carrying = sum(label in labels for labels, _, _ in results(app).values())
    page = root.get(f"/taxonomies/{SLUG}/labels").get_data(as_text=True)
    assert "No label changes yet" in page and label in page

    bad = root.post(
        f"/taxonomies/{SLUG}/labels/split", data={"label": label, "targets": "A: x\nB: y", "action": "apply"}
    )
    assert bad.status_code == 400 and "default target" in bad.get_data(as_text=True)
    unknown = root.post(f"/taxonomies/{SLUG}/labels/merge", data={"sources": [label], "into": "M", "action": "apply"})
    assert unknown.status_code == 400 and "at least two different labels" in unknown.get_data(as_text=True)
    form = {"label": label, "targets": f"Part A: zzzunmatched\n{label}", "note": "finer"}
    preview = root.post(f"/taxonomies/{SLUG}/labels/split", data={**form, "action": "preview"})
    assert preview.status_code == 200 and "data-preview" in preview.get_data(as_text=True)
    assert f"{carrying} stored prediction(s)" in preview.get_data(as_text=True)
    assert db_changes(app) == []

    applied = root.post(f"/taxonomies/{SLUG}/labels/split", data={**form, "action": "apply"}, follow_redirects=True)
    assert applied.status_code == 200 and "Change #1 applied" in applied.get_data(as_text=True)
    assert "Undo #1" in applied.get_data(as_text=True) and "finer" in applied.get_data(as_text=True)
    undone = root.post(f"/taxonomies/{SLUG}/labels/changes/1/undo", follow_redirects=True)
    assert "Change #1 undone" in undone.get_data(as_text=True) and "Undo #1" not in undone.get_data(as_text=True)
    again = root.post(f"/taxonomies/{SLUG}/labels/changes/1/undo", follow_redirects=True)
    assert "Not undone: change #1 was already undone" in again.get_data(as_text=True)


def test_exports_csv_use_the_new_names(app: Flask, client: FlaskClient, predicted: list[int]) -> None:
    admin = token(app)
    (label,) = most_predicted(app)
    change(client, admin, kind="rename", **{"from": label, "to": "In CSV"})
    rows = list(
        csv.DictReader(io.StringIO(client.get("/api/v1/predictions.csv", headers=admin).get_data(as_text=True)))
    )
    cells = [row[f"{SLUG}.predicted"] for row in rows]
    assert any("In CSV" in cell for cell in cells) and not any(label in cell.split("|") for cell in cells)


def test_accepted_proposals_follow_a_rename(app: Flask, client: FlaskClient, predicted: list[int]) -> None:
    admin, curator = token(app), token(app, "cora", "curator")
    body = {"taxonomy": SLUG, "labels": [], "propose": ["Novel Task"]}
    assert client.post(f"/api/v1/predictions/{predicted[0]}/annotations", json=body, headers=curator).status_code == 201
    root = signed_in(app, "root", "admin")
    assert root.post("/curate/labels/1", data={"action": "accept", "final_label": "Novel Task"}).status_code == 302
    assert change(client, admin, kind="rename", **{"from": "Novel Task", "to": "Newer Task"}).status_code == 201
    (taxonomy,) = client.get("/api/v1/taxonomies").get_json()["taxonomies"]
    assert taxonomy["accepted_labels"] == ["Newer Task"]
    assert annotations(client, curator) == {predicted[0]: ["Newer Task"]}
    assert "(now Newer Task)" in root.get("/curate/labels").get_data(as_text=True)


def test_batch_results_csv_uses_the_new_names(app: Flask, client: FlaskClient, abstracts: list[dict]) -> None:
    curator = signed_in(app, "cora", "curator")
    job_id = job_id_of(upload(curator, make_csv(paper_rows(abstracts, 6))))
    assert wait_for(curator, job_id)["status"] == "finished"
    (label,) = most_predicted(app)
    change(client, token(app), kind="rename", **{"from": label, "to": "Batch Name"})
    csv_text = curator.get(f"/batches/{job_id}/results.csv?scores=1").get_data(as_text=True)
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert f"{SLUG}:Batch Name" in rows[0] and f"{SLUG}:{label}" not in rows[0]
    assert any("Batch Name" in row[SLUG].split("; ") for row in rows)
    assert not any(label in row[SLUG].split("; ") for row in rows)


@pytest.mark.trainer
def test_the_next_training_run_uses_the_new_label_set(tmp_path: Path, make_bundle: BundleFactory) -> None:
    """A real (smoke) training against the site's database: its base papers are relabelled by the site's changes."""
    site = make_app(tmp_path / "site")
    with site.app_context():
        import_bundle(make_bundle(seed=3, slug="research-tasks", name="Research tasks"), actor="tests")
        taxonomy = get_taxonomy("research-tasks")
        record_change(taxonomy, "rename", {"from": "Image Classification", "to": "Whole-Image Classification"}, "t")
        record_change(
            taxonomy, "merge", {"sources": ["Question Answering", "Machine Translation"], "into": "QA+MT"}, "t"
        )
    database = site.config["SQLALCHEMY_DATABASE_URI"]
    config = str(REPO_ROOT / "trainer" / "configs" / "smoke.json")
    work = ["--work-dir", str(tmp_path / "work")]
    assert (
        main(["train", "--config", config, "--out", str(tmp_path / "out"), "--database", database, "--force", *work])
        == 0
    )
    manifest = read_manifest(tmp_path / "out")
    assert {"Whole-Image Classification", "QA+MT"} <= set(manifest.labels)
    assert not {"Image Classification", "Question Answering", "Machine Translation"} & set(manifest.labels)
    assert manifest.training_data["label_changes"] == [1, 2]
