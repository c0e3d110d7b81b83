"""Model management from the site: the models page, Activate / Roll back buttons, queueing a retrain that a
trainer worker claims, the run page's live progress and its candidate-versus-active comparison, and who may
do any of it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import PASSWORD, add_user, make_app, signed_in
from webapp.admin import label_comparison, trainer_configs
from webapp.extensions import db
from webapp.models import ApiToken, Taxonomy, TrainingRun, User
from webapp.serving.registry import import_bundle
from webapp.training_runs import update_run

LABELS = ["Object Detection", "Machine Translation", "Question Answering"]


def trainer_metrics(micro: float, f1s: list[float]) -> dict:
    """Metrics shaped like the trainer writes them (a "test" section with per-label figures)."""
    per_label = {
        label: {"precision": f1, "recall": f1, "f1": f1, "support": 10 * (i + 1), "threshold": 0.5}
        for i, (label, f1) in enumerate(zip(LABELS, f1s, strict=True))
    }
    test = {"micro_f1": micro, "macro_f1": micro - 0.1, "micro_precision": 0.7, "micro_recall": 0.6, "examples": 80}
    return {"test": test | {"per_label": per_label}, "validation": {"micro_f1": micro + 0.01}}


@pytest.fixture
def research(app: Flask, make_bundle) -> dict[str, str]:  # noqa: ANN001
    """A ``research-tasks`` taxonomy (which ``trainer/configs/default.json`` trains) with an active version."""
    bundle = make_bundle(
        seed=3,
        slug="research-tasks",
        name="Research tasks",
        labels=LABELS,
        metrics=trainer_metrics(0.61, [0.7, 0.5, 0.4]),
    )
    with app.app_context():
        version = import_bundle(bundle, actor="tests").version.id
    return {"slug": "research-tasks", "active": version}


def active_of(app: Flask, slug: str) -> str | None:
    with app.app_context():
        return db.session.scalar(select(Taxonomy.active_version_id).where(Taxonomy.slug == slug))


def admin_token(app: Flask) -> str:
    with app.app_context():
        user = db.session.scalar(select(User).where(User.name == "ada"))
        token, plain = ApiToken.issue(user, name="trainer")
        db.session.add(token)
        db.session.commit()
        return plain


def test_trainer_configs_prefer_the_slug_named_one_then_default() -> None:
    assert trainer_configs("research-tasks")[0] == "default"
    assert "smoke" in trainer_configs("research-tasks")
    assert trainer_configs("no-such-taxonomy") == []


def test_retrain_queues_a_run_that_a_trainer_worker_claims(
    app: Flask, admin_client: FlaskClient, research: dict[str, str]
) -> None:
    page = admin_client.get("/training").get_data(as_text=True)
    # The research-tasks configs, default first (trainer_configs' order), the quick smoke one among them.
    options = re.findall(r'<option value="([^"]+)">', page)
    assert options == trainer_configs("research-tasks") and options[0] == "default" and "smoke" in options
    assert "No trainer config trains this label set" in page  # the test-tasks taxonomy has none

    response = admin_client.post("/training", data={"taxonomy": "research-tasks", "config": "default"})
    assert response.status_code == 302
    run_id = int(response.headers["Location"].rsplit("/", 1)[1])
    run_page = admin_client.get(f"/training/{run_id}").get_data(as_text=True)
    assert "queued" in run_page and "Waiting for a trainer worker" in run_page
    assert f'data-poll-url="/api/v1/training-runs/{run_id}"' in run_page

    again = admin_client.post("/training", data={"taxonomy": "research-tasks", "config": "default"})
    assert again.headers["Location"].endswith(f"/training/{run_id}")
    with app.app_context():
        assert db.session.query(TrainingRun).count() == 1

    claim = app.test_client().post(
        "/api/v1/training-runs/claim", headers={"Authorization": f"Bearer {admin_token(app)}"}
    )
    assert claim.status_code == 200
    body = claim.get_json()
    assert (body["id"], body["taxonomy"], body["status"], body["config"]) == (
        run_id,
        "research-tasks",
        "running",
        {"config": "default"},
    )
    assert body["requested_by"] == "ada"


@pytest.mark.parametrize(
    "form",
    [
        {"taxonomy": "research-tasks", "config": "../../etc/passwd"},
        {"taxonomy": "research-tasks", "config": "arxiv-categories-that-does-not-exist"},
        {"taxonomy": "test-tasks", "config": "default"},  # default trains research-tasks, not this one
        {"taxonomy": "nope", "config": "default"},
        {},
    ],
)
def test_retrain_refuses_configs_that_do_not_train_the_taxonomy(
    app: Flask, admin_client: FlaskClient, research: dict[str, str], form: dict[str, str]
) -> None:
    response = admin_client.post("/training", data=form, follow_redirects=True)
    assert response.status_code == 200 and "Nothing queued" in response.get_data(as_text=True)
    with app.app_context():
        assert db.session.query(TrainingRun).count() == 0


def test_run_page_shows_progress_then_the_candidate_beside_the_active_model(
    app: Flask,
    admin_client: FlaskClient,
    research: dict[str, str],
    make_bundle,  # noqa: ANN001
) -> None:
    admin_client.post("/training", data={"taxonomy": "research-tasks", "config": "default"})
    with app.app_context():
        run_id = db.session.scalar(select(TrainingRun.id))
        update_run(
            run_id,
            {
                "status": "running",
                "stage": "fitting the head and the lexical classifier",
                "epoch": 2,
                "step": 40,
                "total_steps": 100,
                "loss": 0.12345,
                "eta_seconds": 125,
                "validation_micro_f1": 0.4567,
            },
        )
    page = admin_client.get(f"/training/{run_id}").get_data(as_text=True)
    shown = ('max="100" value="40"', ">2<", "0.1235", "2 min 5 s", "0.457", 'data-poll-status="running"')
    for text in (*shown, ">fitting the head and the lexical classifier<"):
        assert text in page, text

    candidate_bundle = make_bundle(
        seed=4,
        slug="research-tasks",
        name="Research tasks",
        labels=LABELS,
        metrics=trainer_metrics(0.66, [0.8, 0.5, 0.3]),
    )
    with app.app_context():
        candidate = import_bundle(candidate_bundle, actor="trainer").version.id
        gate = {"passed": True, "reason": "passed", "candidate_micro_f1": 0.66, "active_micro_f1": 0.61, "drift": 0.002}
        update_run(run_id, {"status": "finished", "candidate_version": candidate, "gate": gate})
    page = admin_client.get(f"/training/{run_id}").get_data(as_text=True)
    assert "Promotion gate" in page and "0.6600" in page and "0.6100" in page
    assert "0.660" in page and "0.610" in page  # candidate and active micro-F1 side by side
    assert f"/models/{candidate}/activate" in page
    # Per-label rows, the label with most test examples first, with the change against the active model.
    assert page.index("Question Answering") < page.index("Machine Translation") < page.index("Object Detection")
    assert "+0.100" in page and "-0.100" in page and "+0.000" in page

    response = admin_client.post(f"/models/{candidate}/activate", data={"next": f"/training/{run_id}"})
    assert response.status_code == 302 and response.headers["Location"] == f"/training/{run_id}"
    assert active_of(app, "research-tasks") == candidate
    page = admin_client.get(f"/training/{run_id}").get_data(as_text=True)
    assert "the model it replaced" in page and research["active"] in page
    assert "/taxonomies/research-tasks/rollback" in page and f"/models/{candidate}/activate" not in page

    confirmed = {"next": f"/training/{run_id}", "confirm": "yes", "expected": candidate}
    admin_client.post("/taxonomies/research-tasks/rollback", data=confirmed)
    assert active_of(app, "research-tasks") == research["active"]


def test_failed_run_shows_its_error(app: Flask, admin_client: FlaskClient, research: dict[str, str]) -> None:
    admin_client.post("/training", data={"taxonomy": "research-tasks", "config": "smoke"})
    with app.app_context():
        run_id = db.session.scalar(select(TrainingRun.id))
        update_run(run_id, {"status": "failed", "error": "ConfigError: the data file is missing"})
    page = admin_client.get(f"/training/{run_id}").get_data(as_text=True)
    assert "The run failed: ConfigError: the data file is missing" in page
    assert admin_client.get("/training/999").status_code == 404


def test_models_page_lists_metrics_data_size_and_who_activated(
    app: Flask,
    admin_client: FlaskClient,
    research: dict[str, str],
    make_bundle,  # noqa: ANN001
) -> None:
    other = make_bundle(
        seed=5,
        slug="research-tasks",
        name="Research tasks",
        labels=LABELS,
        metrics=trainer_metrics(0.64, [0.7, 0.6, 0.5]),
    )
    with app.app_context():
        newer = import_bundle(other, actor="trainer").version.id
    page = admin_client.get("/models").get_data(as_text=True)
    assert "0.610" in page and "0.510" in page and "0.640" in page  # micro and macro F1 from metrics["test"]
    assert "random weights" not in page and "—" in page  # tiny bundles report no paper count
    assert f"/models/{newer}/activate" in page and f"/models/{research['active']}/activate" not in page
    assert "/taxonomies/research-tasks/rollback" not in page  # the first version has nothing before it

    admin_client.post(f"/models/{newer}/activate")
    assert active_of(app, "research-tasks") == newer
    page = admin_client.get("/models").get_data(as_text=True)
    assert "by ada" in page and "/taxonomies/research-tasks/rollback" in page
    admin_client.post("/taxonomies/research-tasks/rollback", data={"confirm": "yes", "expected": newer})
    assert active_of(app, "research-tasks") == research["active"]
    nothing = admin_client.post("/taxonomies/research-tasks/rollback", follow_redirects=True)
    assert "Nothing rolled back" in nothing.get_data(as_text=True)
    assert admin_client.post("/models/no-such-version/activate").status_code == 404


def test_models_page_shows_papers_and_corrections(app: Flask, admin_client: FlaskClient, make_bundle) -> None:  # noqa: ANN001
    with app.app_context():
        version = import_bundle(make_bundle(seed=6, slug="sized", name="Sized")).version
        version.manifest = version.manifest | {"training_data": {"papers": 8044, "corrections": 12}}
        db.session.commit()
    assert "8,044 papers, 12 corrections" in admin_client.get("/models").get_data(as_text=True)


ADMIN_ONLY = [
    ("get", "/training"),
    ("post", "/training"),
    ("get", "/training/1"),
    ("post", "/models/some-version/activate"),
    ("post", "/taxonomies/research-tasks/rollback"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ONLY)
def test_admin_actions_need_an_admin(app: Flask, research: dict[str, str], method: str, path: str) -> None:
    anonymous = getattr(app.test_client(), method)(path, data={"taxonomy": "research-tasks", "config": "default"})
    assert anonymous.status_code == 302 and "/login" in anonymous.headers["Location"]
    curator = getattr(signed_in(app, "cora", "curator"), method)(
        path, data={"taxonomy": "research-tasks", "config": "default"}
    )
    assert curator.status_code == 403
    with app.app_context():
        assert db.session.query(TrainingRun).count() == 0
    assert active_of(app, "research-tasks") == research["active"]


def test_models_page_is_public_but_buttons_are_for_admins(
    app: Flask,
    research: dict[str, str],
    make_bundle,  # noqa: ANN001
) -> None:
    with app.app_context():
        import_bundle(make_bundle(seed=7, slug="research-tasks", name="Research tasks", labels=LABELS))
    for client in (app.test_client(), signed_in(app, "cora", "curator")):
        page = client.get("/models").get_data(as_text=True)
        assert "Research tasks" in page and "/activate" not in page and "Retrain" not in page


def test_activate_needs_a_csrf_token(tmp_path: Path, make_bundle) -> None:  # noqa: ANN001
    app = make_app(tmp_path / "data", WTF_CSRF_ENABLED=True)
    try:
        with app.app_context():
            first = import_bundle(make_bundle(seed=1)).version.id
            second = import_bundle(make_bundle(seed=2)).version.id
        add_user(app, "ada", "admin")
        client = app.test_client()
        login_page = client.get("/login").get_data(as_text=True)
        token = login_page.split('name="csrf_token" type="hidden" value="')[1].split('"')[0]
        client.post("/login", data={"name": "ada", "password": PASSWORD, "csrf_token": token})
        assert client.post(f"/models/{second}/activate").status_code == 400
        assert active_of(app, "test-tasks") == first
        models_page = client.get("/models").get_data(as_text=True)
        form_token = re.search(r'name="csrf_token" value="([^"]+)"', models_page).group(1)
        assert client.post(f"/models/{second}/activate", data={"csrf_token": form_token}).status_code == 302
        assert active_of(app, "test-tasks") == second
    finally:
        app.extensions["papertag.batch_worker"].stop()


def test_label_comparison_marks_labels_the_other_model_lacked() -> None:
    rows = label_comparison(
        {"per_label": {"A": {"f1": 0.5, "support": 3}, "B": {"f1": 0.2, "support": 9}}},
        {"per_label": {"A": {"f1": 0.4, "support": 3}}},
    )
    assert [(r["label"], r["active_f1"], r["new"]) for r in rows] == [("B", None, True), ("A", 0.4, False)]
    assert label_comparison({"per_label": {"A": {"f1": 0.5}}}, {})[0]["new"] is False
