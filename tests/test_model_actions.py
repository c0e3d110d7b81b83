"""Safe model actions (issue 12 point 7): a candidate that failed the promotion gate is activated only once
confirmed (pages and API), the primary button follows the gate's verdict, Roll back is confirmed on a page that
states its consequence, and the models page never says "serving here" of a version this process no longer serves."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import live_models_of, signed_in
from tests.test_admin_training import LABELS, active_of, admin_token, trainer_metrics
from trainer.data import Paper
from trainer.publish import publish
from webapp.extensions import db
from webapp.models import ActivationEvent, Taxonomy, TrainingRun
from webapp.serving.registry import import_bundle
from webapp.training_runs import PHASES, check_update, create_run, get_run, run_json, time_left, update_run

SLUG = "research-tasks"
FAILED_GATE = {
    "passed": False,
    "reason": "micro-F1 0.0740 is below the active model's 0.6640",
    "candidate_micro_f1": 0.074,
    "active_micro_f1": 0.664,
    "drift": 0.002,
}
PASSED_GATE = FAILED_GATE | {"passed": True, "reason": "passed", "candidate_micro_f1": 0.7}


@pytest.fixture
def versions(app: Flask, make_bundle) -> dict[str, str]:  # noqa: ANN001
    """An active research-tasks version and a candidate of it, produced by a finished training run whose gate
    failed (the figures of the issue: micro-F1 0.074 against 0.664)."""
    bundles = [
        make_bundle(seed=seed, slug=SLUG, name="Research tasks", labels=LABELS, metrics=trainer_metrics(micro, f1s))
        for seed, micro, f1s in ((3, 0.664, [0.7, 0.6, 0.5]), (4, 0.074, [0.1, 0.05, 0.0]))
    ]
    with app.app_context():
        active = import_bundle(bundles[0], actor="tests").version.id
        candidate = import_bundle(bundles[1], actor="trainer").version.id
        taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == SLUG))
        run = TrainingRun(taxonomy=taxonomy, status="finished", candidate_version=candidate, gate=FAILED_GATE)
        db.session.add(run)
        db.session.commit()
        return {"active": active, "candidate": candidate, "run": str(run.id)}


def set_gate(app: Flask, run_id: str, gate: dict) -> None:
    with app.app_context():
        db.session.get(TrainingRun, int(run_id)).gate = gate
        db.session.commit()


def activations(app: Flask) -> int:
    with app.app_context():
        return db.session.query(ActivationEvent).count()


def test_a_failed_candidate_has_no_primary_activate_button(
    app: Flask, admin_client: FlaskClient, versions: dict[str, str]
) -> None:
    candidate, run = versions["candidate"], versions["run"]
    page = admin_client.get(f"/training/{run}").get_data(as_text=True)
    assert "button primary" not in page
    link = re.search(rf'<a class="button danger" href="(/models/{candidate}/activate\?next=[^"]+)">', page)
    assert link and f"Activate {candidate} anyway" in page
    assert f'<form method="post" action="/models/{candidate}/activate"' not in page  # no one-click activation
    models_page = admin_client.get("/models").get_data(as_text=True)
    assert "gate failed" in models_page and f'href="/models/{candidate}/activate"' in models_page
    assert f'action="/models/{candidate}/activate"' not in models_page

    set_gate(app, run, PASSED_GATE)  # the same page once the gate passed: Activate is the primary action again
    page = admin_client.get(f"/training/{run}").get_data(as_text=True)
    assert re.search(rf'action="/models/{candidate}/activate">.*?class="button primary">Activate', page, re.S)
    assert "button danger" not in page and "gate failed" not in admin_client.get("/models").get_data(as_text=True)


def test_the_confirmation_page_states_the_gate_figures_and_activates_once_ticked(
    app: Flask, admin_client: FlaskClient, versions: dict[str, str]
) -> None:
    candidate, active, run = versions["candidate"], versions["active"], versions["run"]
    page = admin_client.get(f"/models/{candidate}/activate?next=/training/{run}").get_data(as_text=True)
    assert f"Activate {candidate}?" in page
    assert "failed the promotion gate" in page and "0.074" in page and "0.664" in page and f"replaces {active}" in page
    assert 'name="confirm" value="yes" required' in page and f'name="next" value="/training/{run}"' in page

    refused = admin_client.post(f"/models/{candidate}/activate", data={"next": f"/training/{run}"})
    assert refused.status_code == 409
    body = refused.get_data(as_text=True)
    assert "Nothing activated" in body and "tick the box" in body and "0.074" in body
    assert active_of(app, SLUG) == active and activations(app) == 2  # the two imports only

    done = admin_client.post(f"/models/{candidate}/activate", data={"next": f"/training/{run}", "confirm": "yes"})
    assert done.status_code == 302 and done.headers["Location"] == f"/training/{run}"
    assert active_of(app, SLUG) == candidate


def test_the_api_refuses_an_unconfirmed_failed_candidate_with_the_gate_figures(
    app: Flask, client: FlaskClient, versions: dict[str, str]
) -> None:
    signed_in(app, "ada", "admin")
    headers = {"Authorization": f"Bearer {admin_token(app)}"}
    url = f"/api/v1/models/{versions['candidate']}/activate"
    for body in (None, {}, {"confirm": False}):
        refused = (
            client.post(url, headers=headers, json=body) if body is not None else client.post(url, headers=headers)
        )
        assert refused.status_code == 409, body
        error = refused.get_json()["error"]
        assert "failed the promotion gate" in error and "0.074" in error and "0.664" in error
    for bad in ({"confirm": "yes"}, {"confirm": 1}, ["confirm"]):
        answer = client.post(url, headers=headers, json=bad)
        assert answer.status_code == 400 and answer.get_json()["error"], bad
    assert active_of(app, SLUG) == versions["active"]
    done = client.post(url, headers=headers, json={"confirm": True})
    assert done.status_code == 200 and done.get_json()["active"] is True
    # A version no gate refused needs no confirmation (the API as before).
    back = client.post(f"/api/v1/models/{versions['active']}/activate", headers=headers)
    assert back.status_code == 200 and active_of(app, SLUG) == versions["active"]


def test_roll_back_is_confirmed_on_a_page_that_states_what_serves_again(
    app: Flask, admin_client: FlaskClient, versions: dict[str, str]
) -> None:
    active, candidate = versions["active"], versions["candidate"]
    admin_client.post(f"/models/{candidate}/activate", data={"confirm": "yes"})
    models_page = admin_client.get("/models").get_data(as_text=True)
    assert f'<a class="button" href="/taxonomies/{SLUG}/rollback">Roll back {candidate}' in models_page
    page = admin_client.get(f"/taxonomies/{SLUG}/rollback").get_data(as_text=True)
    assert f"{active} becomes the active Research tasks model again instead of {candidate}" in page
    assert "test micro-F1 0.664 instead of 0.074" in page and f'name="expected" value="{candidate}"' in page

    unticked = admin_client.post(f"/taxonomies/{SLUG}/rollback", data={"expected": candidate})
    assert unticked.status_code == 409 and "tick the box" in unticked.get_data(as_text=True)
    stale = admin_client.post(f"/taxonomies/{SLUG}/rollback", data={"expected": active, "confirm": "yes"})
    assert stale.status_code == 409 and f"changed to {candidate} meanwhile" in stale.get_data(as_text=True)
    assert active_of(app, SLUG) == candidate

    done = admin_client.post(f"/taxonomies/{SLUG}/rollback", data={"expected": candidate, "confirm": "yes"})
    assert done.status_code == 302 and active_of(app, SLUG) == active
    nothing = admin_client.get(f"/taxonomies/{SLUG}/rollback", follow_redirects=True).get_data(as_text=True)
    assert "Nothing to roll back" in nothing


def test_models_page_is_not_stale_right_after_roll_back(
    app: Flask, admin_client: FlaskClient, versions: dict[str, str]
) -> None:
    """The page after Roll back used to show "serving here" on the version just rolled back from: the process had
    not polled yet. The action now switches its own process before redirecting, and the page tells a process
    that has not switched yet apart from one that has."""
    active, candidate = versions["active"], versions["candidate"]
    live = live_models_of(app)
    app.config["MODEL_POLL_SECONDS"] = 3600  # the watcher would hide the bug by polling first
    live.stop()
    live.ensure_started()
    admin_client.post(f"/models/{candidate}/activate", data={"confirm": "yes"})
    assert live.loaded()[SLUG] == candidate
    admin_client.post(f"/taxonomies/{SLUG}/rollback", data={"expected": candidate, "confirm": "yes"})
    page = admin_client.get("/models").get_data(as_text=True)
    assert live.loaded()[SLUG] == active
    row = re.search(rf'<tr class="active-row">\s*<td class="version">{active}</td>.*?</tr>', page, re.S)
    assert row and "serving here" in row.group(0) and "still serving" not in page and "switching" not in page

    with app.app_context():  # another process activated it: this one has not polled yet, and says so
        db.session.scalar(select(Taxonomy).where(Taxonomy.slug == SLUG)).active_version_id = candidate
        db.session.commit()
    page = admin_client.get("/models").get_data(as_text=True)
    assert "still serving here" in page and "switching here" in page


ADMIN_ONLY = [
    ("get", "/models/{candidate}/activate"),
    ("post", "/models/{candidate}/activate"),
    ("get", f"/taxonomies/{SLUG}/rollback"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ONLY)
def test_confirmations_are_for_admins(app: Flask, versions: dict[str, str], method: str, path: str) -> None:
    url = path.format(candidate=versions["candidate"])
    anonymous = getattr(app.test_client(), method)(url, data={"confirm": "yes"})
    assert anonymous.status_code == 302 and "/login" in anonymous.headers["Location"]
    curator = getattr(signed_in(app, "cora", "curator"), method)(url, data={"confirm": "yes"})
    assert curator.status_code == 403
    assert active_of(app, SLUG) == versions["active"]


def test_unknown_versions_and_taxonomies_are_404(admin_client: FlaskClient, versions: dict[str, str]) -> None:
    assert admin_client.get("/models/no-such-version/activate").status_code == 404
    assert admin_client.get("/taxonomies/no-such/rollback").status_code == 404
    assert admin_client.post("/taxonomies/no-such/rollback", data={"confirm": "yes"}).status_code == 404


# --- training phases and an honest time left -----------------------------------------------------------------


@pytest.fixture
def run_id(app: Flask, versions: dict[str, str]) -> int:
    """A running research-tasks training run."""
    with app.app_context():
        return create_run(SLUG, {"config": "default"}, requested_by="tests").id


def run_page(client: FlaskClient, run: int) -> str:
    return client.get(f"/training/{run}").get_data(as_text=True)


def phase_states(page: str) -> dict[str, str]:
    """``{phase: done | current | skipped | failed | pending}`` as the page's phase list shows them."""
    return {phase: state for state, phase in re.findall(r'<li class="phase (\w+)" data-phase="(\w+)"', page)}


def test_phase_is_typed_with_an_allowed_set(app: Flask, client: FlaskClient, run_id: int) -> None:
    signed_in(app, "ada", "admin")
    headers = {"Authorization": f"Bearer {admin_token(app)}"}
    for bad in ("training", "", 3, None, "Epoch"):
        answer = client.patch(f"/api/v1/training-runs/{run_id}", json={"phase": bad}, headers=headers)
        assert answer.status_code == 400 and answer.get_json()["error"].startswith("phase must be one of prepare")
    assert list(PHASES) == ["prepare", "epoch", "export", "fit", "gate", "publish"]
    for phase in PHASES:
        answer = client.patch(f"/api/v1/training-runs/{run_id}", json={"phase": phase}, headers=headers)
        assert answer.status_code == 200 and answer.get_json()["progress"]["phase"] == phase


def test_time_left_counts_down_and_never_outlives_its_phase_or_the_run(
    app: Flask, admin_client: FlaskClient, run_id: int
) -> None:
    with app.app_context():
        update_run(run_id, {"phase": "prepare", "stage": "preparing the encoder"})
        assert time_left(get_run(run_id)) is None  # unknown: nothing, not a guess
        first_step = {"phase": "epoch", "epoch": 1, "step": 1, "total_steps": 400, "loss": 0.7, "eta_seconds": 125}
        run = update_run(run_id, first_step)
        made = datetime.fromisoformat(run.progress["eta_at"].removesuffix("Z"))
        assert time_left(run, now=made) == 125 and time_left(run, now=made + timedelta(seconds=30)) == 95
        assert time_left(run, now=made + timedelta(hours=1)) == 0
    page = run_page(admin_client, run_id)  # during the first epoch: its step and an estimate, not "—"
    assert re.search(r'<div data-show-if="progress.step">', page) and ">1</span> / <span" in page
    assert '<div data-show-if="time_left_seconds" id="time-left">' in page and "2 min" in page

    with app.app_context():
        update_run(run_id, {"phase": "epoch", "epoch": 1, "step": 400, "validation_micro_f1": 0.5})
        assert time_left(get_run(run_id)) is not None  # same phase: the estimate still stands, counted down
        run = update_run(run_id, {"phase": "export", "stage": "exporting the encoder to ONNX and int8"})
        assert "eta_seconds" not in run.progress and time_left(run) is None
    page = run_page(admin_client, run_id)
    assert '<div data-show-if="time_left_seconds" id="time-left" hidden>' in page

    with app.app_context():
        update_run(run_id, {"phase": "gate", "eta_seconds": 40})
        run = update_run(run_id, {"status": "finished", "candidate_version": "x", "gate": PASSED_GATE})
        assert "eta_seconds" not in run.progress and run_json(run)["time_left_seconds"] is None
    page = run_page(admin_client, run_id)
    assert 'id="time-left" hidden' in page and "Time left</dt><dd data-field" in page and "40 s" not in page


def test_the_run_page_shows_each_phase_done_current_skipped_or_pending(
    app: Flask, admin_client: FlaskClient, run_id: int
) -> None:
    with app.app_context():
        update_run(run_id, {"phase": "prepare"})
        update_run(run_id, {"phase": "fit", "stage": "reading the abstracts with the encoder"})  # encoder reused
    page = run_page(admin_client, run_id)
    assert phase_states(page) == {
        "prepare": "done",
        "epoch": "skipped",
        "export": "skipped",
        "fit": "current",
        "gate": "pending",
        "publish": "pending",
    }
    assert 'aria-current="step"' in page and 'data-poll-watch="progress.phase" data-poll-watch-value="fit"' in page
    with app.app_context():
        update_run(run_id, {"phase": "gate"})
        update_run(run_id, {"status": "failed", "error": "OSError: the site went away"})
    states = phase_states(run_page(admin_client, run_id))
    assert states["fit"] == "done" and states["gate"] == "failed" and states["publish"] == "pending"


def test_publishing_reports_the_gate_and_publish_phases(app: Flask, make_bundle, abstracts: list[dict]) -> None:  # noqa: ANN001
    """What trainer.publish tells the run record, in order, around the gate and the registration."""
    updates: list[dict] = []

    class Target:
        def active_bundle(self, slug: str, into: Path) -> None:
            return None

        def register(self, bundle_dir: Path) -> str:
            updates.append({"registered": True})
            return "v-new"

        def activate(self, version: str) -> None:
            updates.append({"activated": version})

    papers = [Paper(str(i), a["title"], a["abstract"], ["Machine Translation"]) for i, a in enumerate(abstracts[:4])]
    outcome = publish(Target(), make_bundle(seed=2), papers, progress=updates.append)  # type: ignore[arg-type]
    phases = [update.get("phase") for update in updates]
    assert phases == ["gate", "publish", None, None] and outcome["activated"] is True
    for update in updates[:2]:
        assert update_fields_ok(update)


def update_fields_ok(update: dict) -> bool:
    """The update passes the site's typed checks (what the PATCH endpoint applies)."""
    return check_update(update) == update
