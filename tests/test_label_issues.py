"""Likely label errors (issue 12 point 6): cleanlab over out-of-fold scores finds flipped labels; the trainer's
ranked file imports into the site as LabelIssue rows (base-data papers as dataset predictions), refused whole when
any line is bad; curators see them lowest quality first and fix them with ordinary events, which the trainer then
uses instead of the base data's labels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from playwright.sync_api import Page, expect
from sqlalchemy import func, select

from tests import test_browser
from tests.conftest import add_user, signed_in
from tests.test_browser import SLUG, Site, check_layout, sign_in
from tests.tiny_bundle import LABELS
from trainer.config import TrainConfig
from trainer.data import Paper, merge_corrections
from trainer.label_issues import Scored, issue_rows, out_of_fold, quality_order, write_issues
from webapp.curation.annotations import corrected_predictions
from webapp.curation.curate import queue_query
from webapp.curation.label_issues import DATASET_SOURCE, import_issues, read_issue_file
from webapp.extensions import db
from webapp.jobs.replay import sample as replay_sample
from webapp.models import ApiToken, LabelIssue, Prediction, PredictionResult, Taxonomy, User
from webapp.quality.live import reviews

REPO_ROOT = Path(__file__).resolve().parent.parent
browser, site, page = test_browser.browser, test_browser.site, test_browser.page
TAXONOMY = "test-tasks"


def issue(abstract: str, given: list[str], suggested: list[str], quality: float, **extra: object) -> dict:
    return {
        "taxonomy": TAXONOMY,
        "id": extra.pop("id", "2101.00001"),
        "title": extra.pop("title", "A paper from the data"),
        "abstract": abstract,
        "given": given,
        "suggested": suggested,
        "quality": quality,
        "issue": True,
        "source": "data/pwc-tasks/papers.jsonl.gz 2101.00001",
        "threshold": 0.5,
        "scores": {label: (0.9 if label in suggested else 0.1) for label in LABELS},
        **extra,
    }


def write(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def issue_count(app: Flask) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count(LabelIssue.id)))


# --- trainer: out-of-fold scores and cleanlab's order ---------------------------------------------------------


def synthetic(papers: int = 400, labels: int = 4, flips: int = 12, seed: int = 0) -> tuple[Scored, set[int]]:
    """Papers in well separated clusters (one label each, a second one sometimes), ``flips`` of them relabelled."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, labels, papers)
    centres = rng.normal(0, 4, (labels, 16))
    pooled = centres[truth] + rng.normal(0, 1, (papers, 16))
    targets = np.zeros((papers, labels), dtype=np.float32)
    targets[np.arange(papers), truth] = 1
    flipped = set(rng.choice(papers, flips, replace=False).tolist())
    for i in flipped:  # swap the one true label for another
        targets[i, truth[i]] = 0
        targets[i, (truth[i] + 1) % labels] = 1
    probabilities = out_of_fold(pooled.astype(np.float32), targets, folds=5, c=0.1, seed=13)
    names = [f"label {j}" for j in range(labels)]
    papers_ = [Paper(str(i), f"title {i}", f"abstract {i}", []) for i in range(papers)]
    return Scored(papers_, names, probabilities, targets, 0.5), flipped


def test_flipped_labels_come_first_in_cleanlabs_order() -> None:
    scored, flipped = synthetic()
    quality, order, flagged = quality_order(scored)
    assert set(order[: len(flipped)].tolist()) == flipped
    assert all(flagged[i] for i in flipped)
    assert quality[order[0]] <= quality[order[-1]]


def test_out_of_fold_scores_never_see_the_paper_they_score() -> None:
    # A paper whose features match no other paper's cannot be learnt by heart: its own label gets no help.
    scored, flipped = synthetic(flips=12)
    for i in flipped:
        given = int(np.argmax(scored.targets[i]))
        assert scored.probabilities[i, given] < 0.5


def test_issue_rows_rank_and_describe_each_paper(tmp_path: Path) -> None:
    scored, flipped = synthetic()
    config = TrainConfig.from_dict({"taxonomy_slug": "t", "taxonomy_name": "T", "data": ["data/x.jsonl"]})
    rows = issue_rows(config, scored, limit=20)
    assert [r["rank"] for r in rows] == list(range(1, 21))
    assert [r["quality"] for r in rows] == sorted(r["quality"] for r in rows)
    top = rows[0]
    assert int(top["id"]) in flipped
    assert top["given"] != top["suggested"] and top["issue"] is True
    assert top["source"] == f"data/x.jsonl {top['id']}"
    assert set(top["scores"]) == set(scored.labels)
    out = write_issues(rows, tmp_path / "issues.jsonl")
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [r["id"] for r in rows]


@pytest.mark.trainer
def test_label_issues_cli_on_the_shipped_encoder(tmp_path: Path) -> None:
    """The real command on 300 shipped papers with the shipped frozen encoder: a ranked file the site imports."""
    from trainer.__main__ import main

    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "taxonomy_slug": "research-tasks",
                "taxonomy_name": "Research tasks",
                "data": ["data/pwc-tasks/papers.jsonl.gz"],
                "label_aliases_file": "data/pwc-tasks/label-aliases.json",
                "encoder": "models/research-tasks",
                "max_examples": 300,
                "min_label_count": 5,
            }
        )
    )
    out = tmp_path / "issues.jsonl"
    argv = ["label-issues", "--config", str(config), "--out", str(out), "--folds", "3", "--limit", "50"]
    assert main([*argv, "--work-dir", str(tmp_path / "work")]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 50
    assert [r["quality"] for r in rows] == sorted(r["quality"] for r in rows)
    assert all(r["taxonomy"] == "research-tasks" and r["abstract"] and r["suggested"] for r in rows)
    assert not any("_" in label for r in rows for label in r["given"])  # the aliases merged the duplicates
    assert main(["label-issues", "--config", "trainer/configs/smoke.json", "--out", str(out)]) == 2


# --- site: import, page, and the trainer reading the fixes ------------------------------------------------------


@pytest.fixture
def stored(client: FlaskClient, abstracts: list[dict]) -> dict:
    """One prediction stored the ordinary way."""
    response = client.post(
        "/api/v1/predict", json={"title": abstracts[0]["title"], "abstract": abstracts[0]["abstract"]}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return {**abstracts[0], "id": response.get_json()["predictions"][0]["id"]}


def test_import_adds_base_papers_as_dataset_predictions_and_reuses_stored_ones(
    app: Flask, runner, stored: dict, abstracts: list[dict], tmp_path: Path
) -> None:  # noqa: ANN001
    path = write(
        tmp_path / "issues.jsonl",
        [
            issue(
                abstracts[1]["abstract"],
                ["Code Generation"],
                ["Machine Translation"],
                0.02,
                title=abstracts[1]["title"],
            ),
            issue(
                stored["abstract"],
                ["Object Detection"],
                ["Object Detection", "Semantic Segmentation"],
                0.3,
                title=stored["title"],
            ),
        ],
    )
    result = runner.invoke(args=["labels", "import-issues", str(path)])
    assert result.exit_code == 0, result.output
    assert "2 label issues imported for test-tasks (1 base-data papers added as predictions)" in result.output
    with app.app_context():
        issues = db.session.scalars(select(LabelIssue).order_by(LabelIssue.quality)).all()
        assert [i.prediction_id for i in issues][1] == stored["id"]
        base = issues[0].prediction
        assert base.source == DATASET_SOURCE and base.title == abstracts[1]["title"]
        result_row = db.session.scalar(select(PredictionResult).where(PredictionResult.prediction_id == base.id))
        assert result_row.labels == ["Code Generation"]  # the data's labels, which curators correct
        assert result_row.scores["Machine Translation"] == 0.9
        assert issues[0].given == ["Code Generation"] and issues[0].suggested == ["Machine Translation"]
    # The same file again replaces the queue; no second copy of the base paper.
    assert runner.invoke(args=["labels", "import-issues", str(path)]).exit_code == 0
    with app.app_context():
        assert db.session.scalar(select(func.count(Prediction.id)).where(Prediction.source == DATASET_SOURCE)) == 1
    assert issue_count(app) == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not JSON"),
        (json.dumps({"taxonomy": TAXONOMY}), "line 2: missing abstract, given, suggested, quality, scores"),
        (json.dumps(issue("x" * 40, ["A"], ["B"], 1.5)), "line 2: quality must lie in [0, 1], not 1.5"),
        (json.dumps(issue("x" * 40, ["A"], ["B"], True)), "line 2: quality must be a number"),
        (json.dumps(issue("x" * 40, ["A|B"], ["B"], 0.1)), "line 2: given:"),
        (json.dumps(issue("short", ["A"], ["B"], 0.1)), "line 2: abstract is 5 characters long"),
        (json.dumps(issue("x" * 40, ["A"], ["B"], 0.1, taxonomy="nope")), "no taxonomy 'nope' here; known: test-tasks"),
    ],
)
def test_a_bad_line_refuses_the_whole_file_and_keeps_the_queue(
    app: Flask, runner, abstracts: list[dict], tmp_path: Path, line: str, message: str
) -> None:  # noqa: ANN001
    good = issue(abstracts[2]["abstract"], ["Code Generation"], ["Machine Translation"], 0.1)
    assert runner.invoke(args=["labels", "import-issues", str(write(tmp_path / "ok.jsonl", [good]))]).exit_code == 0
    result = runner.invoke(args=["labels", "import-issues", str(write(tmp_path / "bad.jsonl", [good, line]))])
    assert result.exit_code != 0
    assert message in result.output and "nothing was imported" in result.output
    assert issue_count(app) == 1


def test_too_many_rows_and_empty_files_are_refused(app: Flask, abstracts: list[dict]) -> None:
    rows = [json.dumps(issue(a["abstract"], [], ["Code Generation"], 0.1)) for a in abstracts[:3]]
    with app.app_context(), pytest.raises(ValueError, match="more than LABEL_ISSUES_MAX_ROWS=2 rows"):
        read_issue_file(rows, max_rows=2)
    with app.app_context(), pytest.raises(ValueError, match="holds no issues"):
        read_issue_file(["", "  "], max_rows=2)


def test_the_page_lists_issues_lowest_quality_first_for_curators_only(
    app: Flask, client: FlaskClient, abstracts: list[dict]
) -> None:
    with app.app_context():
        import_issues(
            read_issue_file(
                [
                    json.dumps(
                        issue(abstracts[3]["abstract"], ["Code Generation"], ["Anomaly Detection"], 0.4, title="Later")
                    ),
                    json.dumps(
                        issue(
                            abstracts[4]["abstract"], ["Object Detection"], ["Speech Recognition"], 0.01, title="First"
                        )
                    ),
                ],
                100,
            )
        )
    assert client.get("/label-issues").status_code == 302  # anonymous: the sign-in page
    assert signed_in(app, "rex", "curator").get("/label-issues?state=bogus").status_code == 400
    curator = app.test_client()
    curator.post("/login", data={"name": "rex", "password": "correct horse battery"})
    page_html = curator.get("/label-issues").get_data(as_text=True)
    assert page_html.index("First") < page_html.index("Later")
    assert '<del title="given, doubted">Object Detection</del>' in page_html
    assert '<ins title="suggested, missing">Speech Recognition</ins>' in page_html
    assert "/curate/predictions/" in page_html
    assert curator.get("/label-issues?taxonomy=nope").status_code == 404
    assert "2 papers" in curator.get(f"/label-issues?taxonomy={TAXONOMY}").get_data(as_text=True)


def test_a_curators_fix_replaces_the_base_papers_labels_in_training(app: Flask, abstracts: list[dict]) -> None:
    base_paper = Paper("2101.00001", abstracts[5]["title"], abstracts[5]["abstract"], ["Code Generation"])
    other = Paper("2101.00002", abstracts[6]["title"], abstracts[6]["abstract"], ["Object Detection"])
    with app.app_context():
        import_issues(
            read_issue_file(
                [
                    json.dumps(
                        issue(
                            base_paper.abstract,
                            base_paper.labels,
                            ["Machine Translation"],
                            0.01,
                            title=base_paper.title,
                        )
                    )
                ],
                10,
            )
        )
        prediction_id = db.session.scalar(select(LabelIssue.prediction_id))
    signed_in(app, "cora", "curator")
    with app.app_context():
        token, plain = ApiToken.issue(db.session.scalar(select(User).where(User.name == "cora")), name="t")
        db.session.add(token)
        db.session.commit()
    response = app.test_client().post(
        f"/api/v1/predictions/{prediction_id}/annotations",
        json={"taxonomy": TAXONOMY, "labels": ["Machine Translation"], "note": "the data was wrong"},
        headers={"Authorization": f"Bearer {plain}"},
    )
    assert response.status_code in (200, 201), response.get_data(as_text=True)
    with app.app_context():
        exported = [
            Paper(str(r["id"]), r["title"], r["abstract"], r["labels"]) for r in corrected_predictions(TAXONOMY)
        ]
    merged, counts = merge_corrections([base_paper, other], exported)
    assert counts == {"overridden": 1, "added": 0}
    assert [(p.id, p.labels, p.corrected) for p in merged] == [
        ("2101.00001", ["Machine Translation"], True),
        ("2101.00002", ["Object Detection"], False),
    ]
    curator = app.test_client()
    curator.post("/login", data={"name": "cora", "password": "correct horse battery"})
    assert "No likely label errors left to review" in curator.get("/label-issues").get_data(as_text=True)
    reviewed = curator.get("/label-issues?state=reviewed").get_data(as_text=True)
    assert "reviewed</span>" in reviewed and 'class="chips now"' in reviewed


def test_curator_opens_the_likeliest_error_from_the_list_in_the_browser(
    page: Page, site: Site, abstracts: list[dict]
) -> None:
    rows = [
        issue(a["abstract"], [LABELS[i % 3]], [LABELS[(i + 4) % 8]], round(0.05 * (i + 1), 3), title=a["title"])
        | {"taxonomy": SLUG, "source": f"data/pwc-tasks/papers.jsonl.gz 2106.0{i:04d}"}
        for i, a in enumerate(abstracts[:6])
    ]
    with site.app.app_context():
        import_issues(read_issue_file([json.dumps(r) for r in rows], 100))
    sign_in(page, "cora")
    page.goto("/label-issues")
    items = page.locator(".label-issue")
    expect(items).to_have_count(6)
    expect(items.first.locator(".history-title")).to_have_text(abstracts[0]["title"])
    expect(items.first.locator("ins")).to_have_text(LABELS[4])
    check_layout(page, "label-issues", items.first.locator(".history-title"))
    page.set_viewport_size(test_browser.DESKTOP)
    items.first.locator(".history-title").click()
    expect(page).to_have_url(re.compile(r"/curate/predictions/\d+"))
    expect(page.locator("body")).to_contain_text(abstracts[0]["title"])


def test_the_api_imports_the_file_for_admin_tokens_only(app: Flask, abstracts: list[dict]) -> None:
    signed_in(app, "ada", "admin")
    signed_in(app, "cora", "curator")
    with app.app_context():
        tokens = {}
        for name in ("ada", "cora"):
            token, tokens[name] = ApiToken.issue(db.session.scalar(select(User).where(User.name == name)), name="t")
            db.session.add(token)
        db.session.commit()
    api = app.test_client()
    good = json.dumps(issue(abstracts[7]["abstract"], ["Code Generation"], ["Machine Translation"], 0.05)) + "\n"

    def post(body: str, who: str | None = "ada", mimetype: str = "application/x-ndjson"):  # noqa: ANN202
        headers = {"Authorization": f"Bearer {tokens[who]}"} if who else {}
        return api.post("/api/v1/label-issues", data=body.encode("utf-8"), headers=headers, content_type=mimetype)

    assert post(good, who=None).status_code == 401
    assert post(good, who="cora").status_code == 403
    wrong_type = post(good, mimetype="application/json")
    assert wrong_type.status_code == 415 and "application/x-ndjson" in wrong_type.get_json()["error"]
    bad = post(good + '{"taxonomy": 3}\n')
    assert bad.status_code == 422
    assert "line 2: missing abstract" in bad.get_json()["error"]
    assert issue_count(app) == 0
    created = post(good)
    assert created.status_code == 201, created.get_data(as_text=True)
    assert created.get_json() == {"issues": 1, "papers_added": 1, "taxonomies": [TAXONOMY]}
    assert issue_count(app) == 1


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("[" * 100_000, "line 2: not JSON (it nests deeper than 32 levels)"),
        ('{"quality": ' + "9" * 5000 + "}", "line 2: not JSON (Exceeds the limit (4300 digits)"),
        ('{"taxonomy": "t", "quality": 1' + "0" * 400 + "}", "line 2: cannot be stored (quality is a number out of"),
        ('{"taxonomy": "\\u0000"}', "line 2: cannot be stored (taxonomy holds a NUL character)"),
    ],
    ids=["deep", "5000-digits", "400-digit-quality", "nul"],
)
def test_an_issue_line_that_cannot_be_stored_is_a_422_naming_it(
    app: Flask, abstracts: list[dict], line: str, problem: str
) -> None:
    """Issue lines are read by the request bodies' JSON parser (before: RecursionError, ValueError, OverflowError)."""
    with app.app_context():
        token, plain = ApiToken.issue(db.session.get(User, add_user(app, "ada", "admin")), name="t")
        db.session.add(token)
        db.session.commit()
    good = json.dumps(issue(abstracts[7]["abstract"], ["Code Generation"], ["Machine Translation"], 0.05))
    response = app.test_client().post(
        "/api/v1/label-issues",
        data=f"{good}\n{line}\n".encode(),
        headers={"Authorization": f"Bearer {plain}"},
        content_type="application/x-ndjson",
    )
    assert response.status_code == 422, response.get_data(as_text=True)[:300]
    assert response.get_json()["error"].startswith(problem)
    assert issue_count(app) == 0


def test_a_taxonomy_without_an_active_version_refuses_new_papers(app: Flask, abstracts: list[dict]) -> None:
    from webapp.curation.label_issues import IssueFileError
    from webapp.models import Taxonomy

    with app.app_context():
        db.session.scalar(select(Taxonomy).where(Taxonomy.slug == TAXONOMY)).active_version_id = None
        db.session.commit()
        rows = read_issue_file([json.dumps(issue(abstracts[8]["abstract"], [], ["Code Generation"], 0.1))], 10)
        with pytest.raises(IssueFileError, match="has no active model version"):
            import_issues(rows)
        assert db.session.scalar(select(func.count(Prediction.id))) == 0
    assert issue_count(app) == 0


def curator_token(runner) -> dict[str, str]:  # noqa: ANN001
    plain = runner.invoke(args=["tokens", "create", "cora", "--role", "curator"]).output.strip().splitlines()[-1]
    return {"Authorization": f"Bearer {plain}"}


def test_base_papers_stay_out_of_the_queue_live_quality_and_replay(
    app: Flask, client: FlaskClient, runner, stored: dict, abstracts: list[dict], tmp_path: Path
) -> None:  # noqa: ANN001
    """A base-data paper's result holds the data's labels and out-of-fold scores, not a served model's answer: the
    margin queue, live quality (and so learned thresholds) and replay's sample leave it out, reviewed or not."""
    path = write(tmp_path / "issues.jsonl", [issue(abstracts[1]["abstract"], ["Code Generation"], ["Robotics"], 0.02)])
    assert runner.invoke(args=["labels", "import-issues", str(path)]).exit_code == 0
    curator = curator_token(runner)
    with app.app_context():
        base_id = db.session.scalar(select(Prediction.id).where(Prediction.source == DATASET_SOURCE))
        queued = {r.prediction_id for r in db.session.scalars(queue_query(TAXONOMY))}
        assert queued == {stored["id"]}
        taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == TAXONOMY))
        assert [s.prediction.id for s in replay_sample(taxonomy, 10)] == [stored["id"]]
    for prediction_id in (stored["id"], base_id):
        body = {"taxonomy": TAXONOMY, "action": "accept"}
        response = client.post(f"/api/v1/predictions/{prediction_id}/annotations", json=body, headers=curator)
        assert response.status_code in (200, 201), response.get_data(as_text=True)
    with app.app_context():
        taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == TAXONOMY))
        assert [r.prediction_id for r in reviews(taxonomy.id)] == [stored["id"]]
        sampled = replay_sample(taxonomy, 10)
        assert [(s.prediction.id, s.gold is not None) for s in sampled] == [(stored["id"], True)]


def test_a_skip_is_no_gold_for_replay(app: Flask, client: FlaskClient, runner, stored: dict) -> None:  # noqa: ANN001
    body = {"taxonomy": TAXONOMY, "action": "skip"}
    response = client.post(f"/api/v1/predictions/{stored['id']}/annotations", json=body, headers=curator_token(runner))
    assert response.status_code in (200, 201), response.get_data(as_text=True)
    with app.app_context():
        taxonomy = db.session.scalar(select(Taxonomy).where(Taxonomy.slug == TAXONOMY))
        assert [(s.prediction.id, s.gold) for s in replay_sample(taxonomy, 10)] == [(stored["id"], None)]
