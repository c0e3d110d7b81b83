"""Issue 11 point 12: who may read what, with the real app, under both READ_ACCESS values. Readers: anonymous,
another curator (bob), the owner (cora, who reviewed a prediction and uploaded a batch) and an admin (ada); the
rule table is webapp/access/read_access.py's docstring."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import BundleFactory, live_models_of, make_app, signed_in
from webapp import ConfigurationError, create_app
from webapp.access.read_access import ENDPOINT_READS
from webapp.extensions import db
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER
from webapp.serving.registry import import_bundle
from webapp.training_runs import create_run

SLUG = "test-tasks"
NOTE = "private note about the paper"
BATCH_FILE = "cora-unpublished.csv"
ABSTRACT = "We translate sentences between languages with a neural network trained on parallel text."


@dataclass
class Site:
    app: Flask
    clients: dict[str, FlaskClient]
    tokens: dict[str, dict[str, str]]
    prediction: int
    batch: int
    run: int


def _token(app: Flask, name: str, role: str) -> dict[str, str]:
    output = app.test_cli_runner().invoke(args=["tokens", "create", name, "--role", role]).output
    return {"Authorization": f"Bearer {output.strip().splitlines()[-1]}"}


@pytest.fixture(params=["public", "signed-in"])
def site(request: pytest.FixtureRequest, tmp_path: Path, make_bundle: BundleFactory) -> Iterator[Site]:
    """A site with one anonymous prediction that cora reviewed (with a note), cora's batch and a training run."""
    app = make_app(tmp_path / "data", READ_ACCESS=request.param)
    try:
        with app.app_context():
            import_bundle(make_bundle(seed=1), actor="importer-ivy")
        clients = {
            "anonymous": app.test_client(),
            "other curator": signed_in(app, "bob", "curator"),
            "owner": signed_in(app, "cora", "curator"),
            "admin": signed_in(app, "ada", "admin"),
        }
        tokens = {
            "anonymous": {},
            "other curator": _token(app, "bob", "curator"),
            "owner": _token(app, "cora", "curator"),
        }
        tokens["admin"] = _token(app, "ada", "admin")
        predicted = app.test_client().post("/api/v1/predict", json={"title": "T", "abstract": ABSTRACT})
        prediction = predicted.get_json()["predictions"][0]["id"]
        body = {"taxonomy": SLUG, "labels": [], "note": NOTE}
        reviewed = app.test_client().post(
            f"/api/v1/predictions/{prediction}/annotations", json=body, headers=tokens["owner"]
        )
        assert reviewed.status_code == 201, reviewed.get_json()
        csv = f"title,abstract\nA,{ABSTRACT}\n".encode()
        uploaded = clients["owner"].post(
            "/batches", data={"file": (io.BytesIO(csv), BATCH_FILE)}, content_type="multipart/form-data"
        )
        batch = int(uploaded.headers["Location"].rsplit("/", 1)[1])
        with app.app_context():
            run = create_run(SLUG, {}, requested_by="ada", queued=True).id
        yield Site(app, clients, tokens, prediction, batch, run)
    finally:
        live_models_of(app).stop()
        app.extensions[BATCH_WORKER].stop()
        with app.app_context():
            db.engine.dispose()


READERS = ("anonymous", "other curator", "owner", "admin")
SIGN_IN = "sign in"  # anonymous page readers are sent to the sign-in page
OK, UNAUTHORIZED, HIDDEN = 200, 401, 404


def _page_matrix(site: Site) -> list[tuple[str, dict[str, object]]]:
    """(url, {reader: expected}) for pages; the values depend on READ_ACCESS where the table says so."""
    public = site.app.config["READ_ACCESS"] == "public"
    readable = OK if public else SIGN_IN
    everyone_signed_in = {"other curator": OK, "owner": OK, "admin": OK}
    batch = {"anonymous": SIGN_IN, "other curator": HIDDEN, "owner": OK, "admin": OK}
    return [
        ("/", {"anonymous": OK, **everyone_signed_in}),
        ("/healthz", {"anonymous": OK, **everyone_signed_in}),
        (f"/predictions/{site.prediction}", {"anonymous": readable, **everyone_signed_in}),
        ("/history", {"anonymous": readable, **everyone_signed_in}),
        ("/models", {"anonymous": readable, **everyone_signed_in}),
        (f"/models/{SLUG}/quality", {"anonymous": readable, **everyone_signed_in}),
        (f"/batches/{site.batch}", batch),
        (f"/batches/{site.batch}/status", batch),
        (f"/history?batch={site.batch}", batch),
        (f"/training/{site.run}", {"anonymous": SIGN_IN, "other curator": 403, "owner": 403, "admin": OK}),
    ]


def _api_matrix(site: Site) -> list[tuple[str, dict[str, object]]]:
    """(url, {reader: expected}) for the API, each reader with its token (anonymous without one)."""
    public = site.app.config["READ_ACCESS"] == "public"
    readable = OK if public else UNAUTHORIZED
    everyone = {"other curator": OK, "owner": OK, "admin": OK}
    return [
        ("/api/v1/taxonomies", {"anonymous": OK, **everyone}),
        ("/api/v1/models", {"anonymous": readable, **everyone}),
        (f"/api/v1/taxonomies/{SLUG}/quality", {"anonymous": readable, **everyone}),
        (f"/api/v1/predictions/{site.prediction}/similar", {"anonymous": readable, **everyone}),
        (f"/api/v1/label-suggestions?taxonomy={SLUG}", {"anonymous": readable, **everyone}),
        (f"/api/v1/predictions/{site.prediction}/explanation?taxonomy={SLUG}", {"anonymous": readable, **everyone}),
        (f"/api/v1/taxonomies/{SLUG}/label-changes", {"anonymous": UNAUTHORIZED, **everyone}),
        (f"/api/v1/training-runs/{site.run}", {"anonymous": UNAUTHORIZED, **everyone}),
    ]


def _check(response: object, expected: object, where: tuple) -> None:
    status = response.status_code  # type: ignore[attr-defined]
    if expected == SIGN_IN:
        assert status == 302 and response.headers["Location"].startswith("/login"), where  # type: ignore[attr-defined]
    else:
        assert status == expected, (*where, response.get_data(as_text=True)[:300])  # type: ignore[attr-defined]


def test_page_read_matrix(site: Site) -> None:
    for url, expected in _page_matrix(site):
        for reader in READERS:
            _check(site.clients[reader].get(url), expected[reader], (site.app.config["READ_ACCESS"], reader, url))


def test_api_read_matrix(site: Site) -> None:
    client = site.app.test_client()
    for url, expected in _api_matrix(site):
        for reader in READERS:
            response = client.get(url, headers=site.tokens[reader])
            _check(response, expected[reader], (site.app.config["READ_ACCESS"], reader, url))
    # A signed-in browser reads the API with its session (the page's scripts do).
    assert site.clients["other curator"].get(f"/api/v1/training-runs/{site.run}").status_code == OK


def _names_and_notes(text: str) -> set[str]:
    return {word for word in ("cora", "importer-ivy", NOTE) if word in text}


def test_names_and_notes_are_never_shown_to_anonymous_readers(site: Site) -> None:
    public = site.app.config["READ_ACCESS"] == "public"
    anonymous, curator = site.clients["anonymous"], site.clients["other curator"]
    for url in (f"/predictions/{site.prediction}", "/history", "/models"):
        response = anonymous.get(url)
        assert response.status_code == (OK if public else 302), url  # signed-in: sent to the sign-in page
        assert not _names_and_notes(response.get_data(as_text=True)), url
    assert _names_and_notes(curator.get(f"/predictions/{site.prediction}").get_data(as_text=True)) == {"cora", NOTE}
    assert "reviewed by cora" in curator.get("/history").get_data(as_text=True)
    assert "importer-ivy" in curator.get("/models").get_data(as_text=True)
    models = anonymous.get("/api/v1/models")
    if public:
        assert {m["imported_by"] for m in models.get_json()["models"]} == {None}
    else:
        assert models.status_code == UNAUTHORIZED and "importer-ivy" not in models.get_data(as_text=True)
    with_token = site.app.test_client().get("/api/v1/models", headers=site.tokens["other curator"])
    assert {m["imported_by"] for m in with_token.get_json()["models"]} == {"importer-ivy"}


def test_batches_are_listed_to_their_creator_and_admins_only(site: Site) -> None:
    assert BATCH_FILE in site.clients["owner"].get("/batches").get_data(as_text=True)
    assert BATCH_FILE in site.clients["admin"].get("/batches").get_data(as_text=True)
    assert BATCH_FILE not in site.clients["other curator"].get("/batches").get_data(as_text=True)
    assert site.clients["other curator"].get(f"/batches/{site.batch}/results.csv").status_code == HIDDEN


def test_an_anonymous_visitor_reads_its_own_result_but_nothing_else(site: Site) -> None:
    visitor = site.app.test_client()
    submitted = visitor.post("/", data={"title": "Mine", "abstract": ABSTRACT})
    assert submitted.status_code == 302
    own = submitted.headers["Location"]
    page = visitor.get(own)
    assert page.status_code == OK and "Mine" in page.get_data(as_text=True)
    own_id = int(re.search(r"/predictions/(\d+)", own).group(1))
    explained = visitor.get(f"/api/v1/predictions/{own_id}/explanation?taxonomy={SLUG}")
    assert explained.status_code == OK
    signed_in_only = site.app.config["READ_ACCESS"] == "signed-in"
    # Similar past abstracts are other people's predictions: only where anyone may read those.
    assert ("Similar past abstracts" in page.get_data(as_text=True)) != signed_in_only
    stranger = site.app.test_client()
    assert (stranger.get(own).status_code == 302) == signed_in_only
    assert (visitor.get(f"/predictions/{site.prediction}").status_code == 302) == signed_in_only
    # The predict form and the predict API stay open to anyone.
    assert visitor.post("/api/v1/predict", json={"abstract": ABSTRACT}).status_code == OK


def test_every_get_route_has_a_read_rule(app: Flask) -> None:
    routes = {rule.endpoint for rule in app.url_map.iter_rules() if "GET" in (rule.methods or ())}
    assert routes - set(ENDPOINT_READS) == set(), "add these endpoints to webapp.access.read_access.ENDPOINT_READS"


def test_an_unknown_read_access_value_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="READ_ACCESS must be one of public, signed-in"):
        create_app({"DATA_DIR": str(tmp_path), "SECRET_KEY": "k" * 40, "READ_ACCESS": "everyone"})
