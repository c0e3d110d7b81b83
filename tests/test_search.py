"""Issue 12 point 8, search that finds: full-text history search with the database's own engine (SQLite FTS5 here,
PostgreSQL full-text search on the PostgreSQL pass), ranked, in any word order, immune to query syntax typed by a
user; migration 0010 indexes rows stored before it; the label filter ignores case and separators, per taxonomy,
with suggestions."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

import flask_migrate
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.conftest import BundleFactory, live_models_of, make_app
from tests.tiny_bundle import LABELS
from webapp.extensions import db
from webapp.history.search import Query, parse
from webapp.jobs.batch import EXTENSION_KEY as BATCH_WORKER
from webapp.models import Prediction, Taxonomy
from webapp.serving.registry import activate, import_bundle

PAPERS = {
    "seg": ("Networks for image segmentation", "We segment medical images with convolutional networks."),
    "seg-abstract": ("A survey of vision", "Among the tasks, segmentation of scenes by deep networks is one."),
    "translate": ("Neural machine translation", "Attention lets a model translate long sentences."),
    "graph": ("Graph neural networks", "Message passing over graph structure; no images here."),
    "near": ("NEAR and far", "A paper whose title holds a query keyword: near (a b) or not."),
}


def add_papers(app: Flask) -> dict[str, int]:
    """The papers above as stored predictions, one minute apart in the order listed (the last is the newest)."""
    start = datetime(2026, 1, 1)
    ids = {}
    with app.app_context():
        for n, (key, (title, abstract)) in enumerate(PAPERS.items()):
            row = Prediction(
                title=title,
                abstract=abstract,
                text_sha256="0" * 64,
                source="web",
                created_at=start + timedelta(minutes=n),
            )
            db.session.add(row)
            db.session.flush()
            ids[key] = row.id
        db.session.commit()
    return ids


def listed(client: FlaskClient, query: str | dict[str, str]) -> list[int]:
    """The prediction ids the history lists for ``query`` (a query string or its arguments), in page order."""
    response = client.get("/history", query_string=query)
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    return [
        int(i) for i in re.findall(r'class="history-title" href="/predictions/(\d+)"', response.get_data(as_text=True))
    ]


def test_parse_reads_web_search_rules_and_keeps_only_words() -> None:
    assert parse('graph "neural network" -vision') == Query((("graph",), ("neural network",)), ("vision",))
    assert parse("graph OR vision translation") == Query((("graph", "vision"), ("translation",)))
    assert parse('"unbalanced phrase') == Query((("unbalanced phrase",),))
    assert parse("trans* NEAR(a b) (x) ^y") == Query((("trans",), ("NEAR a",), ("b",), ("x",), ("y",)))
    assert parse('* " -- ( ) % _ :').empty
    assert parse("or graph").groups == (("or",), ("graph",))  # a leading "or" is a word
    assert parse("state-of-the-art").groups == (("state of the art",),)
    assert parse('x "y"').fts5() == '("x") AND ("y")' and parse('x -"y z"').websearch() == '"x" -"y z"'


def test_words_in_any_order_and_forms_find_papers_ranked(app: Flask, client: FlaskClient) -> None:
    ids = add_papers(app)
    # The case: "Segmentation networks" finds what "segmentation" finds (any order, stems).
    found = listed(client, "q=Segmentation+networks")
    assert set(found) == {ids["seg"], ids["seg-abstract"]}
    assert set(listed(client, "q=networks+segmenting")) == set(found)
    assert set(listed(client, "q=segmentation")) >= set(found)
    # Ranked: both words in the title beats one abstract sentence, although the latter paper is newer.
    assert found[0] == ids["seg"]
    # No query: newest first.
    assert listed(client, "")[:2] == [ids["near"], ids["graph"]]


def test_phrases_exclusions_and_or(app: Flask, client: FlaskClient) -> None:
    ids = add_papers(app)
    assert listed(client, "q=%22machine+translation%22") == [ids["translate"]]
    assert listed(client, "q=%22translation+machine%22") == []  # a phrase keeps its order
    assert set(listed(client, "q=networks+-medical")) == {ids["seg-abstract"], ids["graph"]}
    assert set(listed(client, "q=graph+OR+translate")) == {ids["graph"], ids["translate"]}
    only_excluded = set(listed(client, "q=-networks"))
    assert only_excluded == {ids["translate"], ids["near"]}


@pytest.mark.parametrize(
    "typed",
    [
        '"',
        '"unbalanced',
        'graph "',
        "*",
        "graph*",
        "NEAR",
        "NEAR(graph networks)",
        "graph NEAR networks",
        "-",
        "--graph",
        "-(",
        "(",
        "(graph",
        "graph)",
        "()",
        "AND",
        "OR",
        "NOT",
        "graph OR",
        "graph AND NOT networks",
        "'",
        "\\",
        "%",
        "_",
        "^graph",
        "title:graph",
        "{title abstract}:graph",
        "graph & networks | !images",
        "graph <-> networks",
        "graph:*",
        ";DROP TABLE predictions;--",
        "\u00e9t\u00e9 \u00fcber na\u00efve",
        "x" * 200,
        " ".join(["graph"] * 100),
    ],
)
def test_no_input_breaks_the_query(app: Flask, client: FlaskClient, typed: str) -> None:
    ids = add_papers(app)
    response = client.get("/history", query_string={"q": typed})
    assert response.status_code == 200
    words = parse(typed)
    if words.empty:
        assert "has no word to look for" in response.get_data(as_text=True)
    if words == Query((("graph",),)):  # graph*, (graph, title:graph, ^graph...: the word graph
        assert listed(client, {"q": typed}) == [ids["graph"]]
    assert len(listed(client, {})) == len(ids), "the search lost nothing"


def test_keywords_in_text_are_words(app: Flask, client: FlaskClient) -> None:
    ids = add_papers(app)
    assert listed(client, "q=NEAR") == [ids["near"]]
    assert listed(client, "q=near+or+not") == [ids["near"]]  # "or" between words; both words are in that paper
    assert listed(client, "q=graph*") == [ids["graph"]]


def test_index_follows_inserts_and_deletes(app: Flask, client: FlaskClient) -> None:
    ids = add_papers(app)
    with app.app_context():
        db.session.delete(db.session.get(Prediction, ids["graph"]))
        db.session.add(
            Prediction(title="Graph kernels", abstract="Kernels on graphs.", text_sha256="1" * 64, source="web")
        )
        db.session.commit()
    found = listed(client, "q=graph")
    assert len(found) == 1 and found[0] != ids["graph"]


def test_migration_indexes_rows_stored_before_it(tmp_path: Path) -> None:
    app = make_app(tmp_path / "data")
    try:
        with app.app_context():
            flask_migrate.downgrade(revision="0009_curation_v2")
            db.session.execute(
                db.text(
                    "INSERT INTO predictions (title, abstract, text_sha256, source, created_at) "
                    "VALUES ('Older segmentation networks', 'Stored before full-text search.', :h, 'web', :t)"
                ),
                {"h": "2" * 64, "t": datetime(2025, 1, 1)},
            )
            db.session.commit()
            db.session.remove()
            flask_migrate.upgrade()
        assert len(listed(app.test_client(), "q=networks+segmentation")) == 1
    finally:
        live_models_of(app).stop()
        app.extensions[BATCH_WORKER].stop()
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


@pytest.fixture
def two_taxonomies(app: Flask, make_bundle: BundleFactory, abstracts: list[dict]) -> list[int]:
    """A second taxonomy sharing one label spelling with the first; every label predicted (threshold 0.001), so the
    stored labels are known. Returns the predictions' ids."""
    with app.app_context():
        activate(import_bundle(make_bundle(seed=1, threshold=0.001), actor="tests").version.id)  # all labels
        import_bundle(
            make_bundle(
                seed=4,
                slug="test-topics",
                name="Test topics",
                threshold=0.001,
                labels=["graph_learning", "Object Detection"],
            ),
            actor="tests",
        )
    live_models_of(app).refresh()
    client = app.test_client()
    batch = [{"title": a["title"], "abstract": a["abstract"]} for a in abstracts[:3]]
    response = client.post("/api/v1/predict", json={"abstracts": batch})
    assert response.status_code == 200, response.get_data(as_text=True)
    return [p["id"] for p in response.get_json()["predictions"]]


def test_label_filter_ignores_case_and_separators(client: FlaskClient, two_taxonomies: list[int]) -> None:
    everything = sorted(two_taxonomies)
    for typed in (
        "Object Detection",
        "object detection",
        "OBJECT_DETECTION",
        "object-detection",
        "  object   detection ",
    ):
        assert sorted(listed(client, f"label={typed}")) == everything, typed
    assert sorted(listed(client, "label=Graph Learning")) == everything
    assert sorted(listed(client, "taxonomy=test-topics&label=GRAPH_LEARNING")) == everything
    # The taxonomy is chosen apart: test-tasks has no graph_learning.
    page = client.get("/history?taxonomy=test-tasks&label=graph+learning").get_data(as_text=True)
    assert "No label reads “graph learning” in this taxonomy" in page
    assert sorted(listed(client, "taxonomy=test-tasks&label=graph+learning")) == []


def test_a_label_both_taxonomies_spell_alike_is_filtered_in_the_chosen_one(
    app: Flask, client: FlaskClient, two_taxonomies: list[int]
) -> None:
    """Label rows name their taxonomy: a curator removing "Object Detection" from one paper in test-tasks takes it
    out of that taxonomy's filter only; test-topics still lists it."""
    token = app.test_cli_runner().invoke(args=["tokens", "create", "cora", "--role", "curator"]).output
    headers = {"Authorization": f"Bearer {token.strip().splitlines()[-1]}"}
    pid = two_taxonomies[0]
    kept = [label for label in LABELS if label != "Object Detection"]
    review = {"taxonomy": "test-tasks", "labels": kept}
    assert client.post(f"/api/v1/predictions/{pid}/annotations", json=review, headers=headers).status_code == 201
    others = sorted(set(two_taxonomies) - {pid})
    assert sorted(listed(client, "taxonomy=test-tasks&label=object+detection")) == others
    assert sorted(listed(client, "taxonomy=test-topics&label=object+detection")) == sorted(two_taxonomies)
    assert sorted(listed(client, "label=object+detection")) == sorted(two_taxonomies)
    assert sorted(listed(client, "taxonomy=test-tasks&label=" + kept[0].replace(" ", "+"))) == sorted(two_taxonomies)


def test_unknown_label_is_named_with_suggestions(client: FlaskClient, two_taxonomies: list[int]) -> None:
    page = client.get("/history?label=Objet+Detecton").get_data(as_text=True)
    assert "No label reads “Objet Detecton”" in page
    assert re.search(r'<a href="/history\?[^"]*label=Object\+Detection[^"]*">Object Detection</a>', page)


def test_bad_taxonomy_is_a_clear_400(client: FlaskClient, two_taxonomies: list[int]) -> None:
    response = client.get("/history?taxonomy=nope")
    assert response.status_code == 400
    assert "taxonomy must be one of" in response.get_data(as_text=True) and "test-topics" in response.get_data(
        as_text=True
    )
    api = client.get("/api/v1/label-suggestions?taxonomy=nope")
    assert api.status_code == 400 and "nope" in api.get_json()["error"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("label=%00", "the query string&#39;s &#39;label&#39; holds a NUL character"),
        ("label=Object%00Detection", "the query string&#39;s &#39;label&#39; holds a NUL character"),
        ("label=%1B", "label must not contain control characters"),
        ("version=v%1Bx", "version must not contain control characters"),
        ("version=v%00", "the query string&#39;s &#39;version&#39; holds a NUL character"),
    ],
)
def test_control_characters_in_a_filter_are_a_clear_400(client: FlaskClient, query: str, message: str) -> None:
    response = client.get(f"/history?{query}")
    assert response.status_code == 400
    assert message in response.get_data(as_text=True)


def test_suggestions_per_taxonomy(client: FlaskClient, two_taxonomies: list[int]) -> None:
    body = client.get("/api/v1/label-suggestions").get_json()
    by_slug = {t["slug"]: t["labels"] for t in body["taxonomies"]}
    assert by_slug["test-topics"] == ["graph_learning", "Object Detection"]
    assert "Semantic Segmentation" in by_slug["test-tasks"] and "graph_learning" not in by_slug["test-tasks"]
    one = client.get("/api/v1/label-suggestions?taxonomy=test-tasks&q=DETECTION").get_json()["taxonomies"]
    assert one == [{"slug": "test-tasks", "name": "Test tasks", "labels": ["Anomaly Detection", "Object Detection"]}]
    # The page renders the chosen taxonomy's suggestions itself (no JavaScript needed) and groups row labels.
    page = client.get("/history?taxonomy=test-topics").get_data(as_text=True)
    datalist = re.search(r'<datalist id="known-labels">(.*?)</datalist>', page, re.S).group(1)
    assert re.findall(r'value="([^"]+)"', datalist) == ["graph_learning", "Object Detection"]
    assert 'data-taxonomy="test-tasks"' in page and 'data-taxonomy="test-topics"' in page


def test_suggestions_keep_up_with_labels_stored_after_the_first_reading(
    app: Flask, make_bundle: BundleFactory, abstracts: list[dict]
) -> None:
    """Each app reads the stored labels once, then only the rows stored since (a full read costs 0.7 s at a million
    predictions): a label stored later by a version that is no longer active is still suggested."""
    client = app.test_client()

    def suggested() -> list[str]:
        body = client.get("/api/v1/label-suggestions?taxonomy=test-tasks").get_json()
        return body["taxonomies"][0]["labels"]

    assert "Brand New Task" not in suggested()  # the first reading
    with app.app_context():
        first = db.session.scalar(select(Taxonomy.active_version_id).where(Taxonomy.slug == "test-tasks"))
        newer = import_bundle(make_bundle(seed=2, threshold=0.001, labels=[*LABELS, "Brand New Task"]), actor="tests")
        activate(newer.version.id)
    live_models_of(app).refresh()
    response = client.post("/api/v1/predict", json={"abstract": abstracts[0]["abstract"]})
    assert "Brand New Task" in response.get_json()["predictions"][0]["results"]["test-tasks"]["labels"]
    with app.app_context():
        activate(first)  # the label is in no active version now: only the stored rows name it
    live_models_of(app).refresh()
    assert "Brand New Task" in suggested()
